"""A small kustomize renderer for the manifests in k8s/, so tests can check what an overlay applies.

There is no kustomize binary on our machines. This implements the subset of kustomize that k8s/
uses, with kustomize's semantics: `resources` (files and directories), `namespace`, `labels`
(metadata labels only), `images` (every `image` inside a `containers` / `initContainers` list, as
kustomize's image transformer does for custom resources too), and `patches` that are either a JSON
6902 op list with a `target`, or a strategic-merge patch that deletes a resource (`$patch: delete`).
Anything else in a kustomization is an error, so the renderer never silently ignores a feature it
does not implement.

    render(Path("k8s/overlays/gpu")) -> [Resource(obj=..., origin="k8s/rayjob-train.yaml"), ...]
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "namespace", "labels", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


class RenderError(ValueError):
    """A kustomization or patch this renderer (and so likely kustomize) cannot build."""


@dataclass
class Resource:
    obj: dict[str, Any]
    # The file the resource comes from, plus the overlays that changed it.
    origin: str

    @property
    def id(self) -> tuple[str, str, str]:
        meta = self.obj.get("metadata", {})
        return self.obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def rel(path: Path) -> str:
    """A path as the tests print it: relative to the repository root where possible."""
    root = Path(__file__).resolve().parents[1]
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a file; each must be a mapping."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{rel(path)}: invalid YAML ({e})") from None
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise RenderError(f"{rel(path)}: document {i} is a {type(doc).__name__}, not a mapping")
    return docs


def render(directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize DIRECTORY` would print, in order."""
    path = directory / "kustomization.yaml"
    where = rel(path)
    if not path.is_file():
        raise RenderError(f"{rel(directory)}: no kustomization.yaml")
    (kust,) = load_documents(path)
    unknown = set(kust) - KUSTOMIZATION_KEYS
    if unknown:
        raise RenderError(
            f"{where}: {', '.join(sorted(unknown))}: not supported by tests/k8s_render.py"
        )
    if kust.get("kind") != "Kustomization":
        raise RenderError(f"{where}: kind: expected Kustomization, got {kust.get('kind')!r}")

    resources: list[Resource] = []
    for i, entry in enumerate(kust.get("resources", [])):
        target = (directory / entry).resolve()
        if target.is_dir():
            for r in render(target):
                r.origin = f"{r.origin} via {where}"
                resources.append(r)
        elif target.is_file():
            # kustomize refuses files outside the kustomization root (its load restrictor).
            if directory.resolve() not in target.parents:
                raise RenderError(f"{where}: resources[{i}]: {entry} is outside {rel(directory)}")
            resources += [Resource(doc, rel(target)) for doc in load_documents(target)]
        else:
            raise RenderError(f"{where}: resources[{i}]: {entry} does not exist")

    for i, patch in enumerate(kust.get("patches", [])):
        resources = _apply_patch(resources, patch, f"{where}: patches[{i}]", directory)

    if "namespace" in kust:
        for r in resources:
            if r.obj.get("kind") not in CLUSTER_SCOPED:
                r.obj.setdefault("metadata", {})["namespace"] = kust["namespace"]
    for i, spec in enumerate(kust.get("labels", [])):
        extra = set(spec) - {"pairs"}
        if extra:
            raise RenderError(f"{where}: labels[{i}]: {', '.join(sorted(extra))}: not supported")
        for r in resources:
            r.obj.setdefault("metadata", {}).setdefault("labels", {}).update(spec["pairs"])
    for i, image in enumerate(kust.get("images", [])):
        extra = set(image) - {"name", "newName", "newTag"}
        if extra:
            raise RenderError(f"{where}: images[{i}]: {', '.join(sorted(extra))}: not supported")
        for r in resources:
            _set_images(r.obj, image, in_containers=False)

    seen: dict[tuple[str, str, str], str] = {}
    for r in resources:
        if r.id in seen:
            raise RenderError(f"{where}: {'/'.join(r.id)} defined twice ({seen[r.id]}, {r.origin})")
        seen[r.id] = r.origin
    return resources


# --- patches ------------------------------------------------------------------------------------


def _apply_patch(
    resources: list[Resource], patch: dict, where: str, directory: Path
) -> list[Resource]:
    extra = set(patch) - {"patch", "path", "target"}
    if extra:
        raise RenderError(f"{where}: {', '.join(sorted(extra))}: not supported")
    if "path" in patch:
        text = (directory / patch["path"]).read_text()
    elif "patch" in patch:
        text = patch["patch"]
    else:
        raise RenderError(f"{where}: needs `patch` or `path`")
    try:
        body = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RenderError(f"{where}: invalid YAML ({e})") from None

    if isinstance(body, list):  # JSON 6902
        target = patch.get("target")
        if not target:
            raise RenderError(f"{where}: a JSON 6902 patch needs a target")
        matched = [r for r in resources if _matches(r, target)]
        if not matched:
            raise RenderError(f"{where}: target {target} matches no resource")
        for r in matched:
            for j, op in enumerate(body):
                try:
                    r.obj = apply_json_patch_op(r.obj, op)
                except (KeyError, IndexError, ValueError, TypeError) as e:
                    raise RenderError(
                        f"{where}: op {j} ({op.get('op')} {op.get('path')}): {e}"
                    ) from None
            r.origin = f"{r.origin} patched by {where.split(':', maxsplit=1)[0]}"
        return resources

    if isinstance(body, dict) and body.get("$patch") == "delete":
        target = patch.get("target") or {
            "kind": body.get("kind"),
            "name": body.get("metadata", {}).get("name"),
        }
        kept = [r for r in resources if not _matches(r, target)]
        if len(kept) == len(resources):
            raise RenderError(f"{where}: $patch: delete of {target} matches no resource")
        return kept
    raise RenderError(f"{where}: only JSON 6902 patches and `$patch: delete` are supported")


def _matches(r: Resource, target: dict) -> bool:
    extra = set(target) - {"kind", "name", "group", "version"}
    if extra:
        raise RenderError(f"target {target}: {', '.join(sorted(extra))}: not supported")
    api = r.obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    return (
        target.get("kind", r.obj.get("kind")) == r.obj.get("kind")
        and target.get("name", r.id[2]) == r.id[2]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def apply_json_patch_op(doc: Any, op: dict) -> Any:
    """RFC 6902 add / remove / replace / test on a copy of `doc`."""
    doc = copy.deepcopy(doc)
    kind, parts = op["op"], _pointer(op["path"])
    if not parts:
        raise ValueError("patching the document root is not supported")
    parent = doc
    for p in parts[:-1]:
        parent = parent[int(p)] if isinstance(parent, list) else parent[p]
    last = parts[-1]
    if isinstance(parent, list):
        if kind == "add":
            index = len(parent) if last == "-" else int(last)
            if index > len(parent):
                raise IndexError(f"index {index} out of range")
            parent.insert(index, op["value"])
        elif kind == "remove":
            del parent[int(last)]
        elif kind == "replace":
            if not -len(parent) <= int(last) < len(parent):
                raise IndexError(f"index {last} out of range")
            parent[int(last)] = op["value"]
        elif kind == "test":
            if parent[int(last)] != op["value"]:
                raise ValueError("test failed")
        else:
            raise ValueError(f"op {kind!r} not supported")
        return doc
    if not isinstance(parent, dict):
        raise TypeError(f"{'/'.join(parts[:-1])} is not an object")
    if kind == "add":
        parent[last] = op["value"]
    elif kind == "remove":
        del parent[last]
    elif kind == "replace":
        if last not in parent:
            raise KeyError(f"{last} does not exist (replace needs an existing value)")
        parent[last] = op["value"]
    elif kind == "test":
        if parent.get(last) != op["value"]:
            raise ValueError("test failed")
    else:
        raise ValueError(f"op {kind!r} not supported")
    return doc


# --- images -------------------------------------------------------------------------------------


def split_image(ref: str) -> tuple[str, str]:
    """'registry:5000/ns/srtrain:0.1.0' -> ('registry:5000/ns/srtrain', '0.1.0')."""
    name = ref.partition("@")[0]
    head, sep, tag = name.rpartition(":")
    if sep and "/" not in tag:
        return head, tag
    return name, ""


def _set_images(node: Any, image: dict, in_containers: bool) -> None:
    if isinstance(node, dict):
        if in_containers and isinstance(node.get("image"), str):
            name, tag = split_image(node["image"])
            if name == image["name"]:
                node["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        for key, value in node.items():
            _set_images(value, image, key in ("containers", "initContainers"))
    elif isinstance(node, list):
        for item in node:
            _set_images(item, image, in_containers)
