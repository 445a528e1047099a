"""Checks of the Kubernetes deployment (k8s/, Dockerfile, jobs/iaprtc12-*.yaml), used by
tests/test_k8s.py.

Manifests are rendered by the real kustomize inside `kubectl` (`kubectl kustomize`), KubeRay
resources are validated against the operator's CRD schemas vendored in tests/schemas/kuberay (with
unknown fields rejected, as `kubectl apply --validate=strict` does), core kinds with
kubernetes-validate --strict, the Prometheus PodMonitor structurally, and every command, job file,
image tag, Ray version and GPU count the manifests name is checked against the repository. Each
checker returns problems as "<file>: <Kind>/<name>: <field path>: <what is wrong>", where <file> is
the manifest a rendered resource comes from.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.specifiers import SpecifierSet

from srtrain.config import Config, ConfigError, load_config

# --- rendering with kubectl's kustomize ---------------------------------------------------------

ORIGIN = "config.kubernetes.io/origin"


class KustomizeError(RuntimeError):
    """`kubectl kustomize` refused to build a directory; the message is kustomize's own."""


@dataclass
class Resource:
    obj: dict[str, Any]
    # The file it comes from (kustomize's origin annotation), relative to the repository.
    origin: str

    @property
    def id(self) -> tuple[str, str, str]:
        meta = self.obj.get("metadata", {})
        return self.obj.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def rel(path: Path) -> str:
    """A path as the tests print it: relative to the repository root where possible."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a file."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kubectl() -> str:
    """The kubectl binary, or a skip: kubectl is on every machine of ours and in CI."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not on PATH: these checks render k8s/ with `kubectl kustomize`")
    return found


def run_kustomize(directory: Path) -> str:
    """`kubectl kustomize DIRECTORY`'s output, or KustomizeError with kustomize's message."""
    p = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if p.returncode != 0:
        # kubectl logs through klog: drop its prefix, keep kustomize's message on one line
        message = re.sub(r'^\S+ [\d:.]+\s+\d+ \S+\] "command failed" err=', "", p.stderr.strip())
        message = " ".join(message.strip('<>"\n ').split())
        raise KustomizeError(f"kubectl kustomize {rel(directory)}: {message}")
    return p.stdout


def kustomize(directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize DIRECTORY` prints, each with the file it comes from.

    The directory is built through a wrapper kustomization that adds only kustomize's origin
    annotations (buildMetadata), which are then removed, so the objects are exactly those of
    `kubectl kustomize DIRECTORY`."""
    with tempfile.TemporaryDirectory(prefix="k8s-origin-") as tmp:
        (Path(tmp) / "kustomization.yaml").write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "kustomize.config.k8s.io/v1beta1",
                    "kind": "Kustomization",
                    # kustomize takes a relative path only
                    "resources": [os.path.relpath(directory.resolve(), tmp)],
                    "buildMetadata": ["originAnnotations"],
                }
            )
        )
        try:
            text = run_kustomize(Path(tmp))
        except KustomizeError as e:
            raise KustomizeError(str(e).replace(rel(Path(tmp)), rel(directory))) from None
        out = []
        for obj in yaml.safe_load_all(text):
            meta = obj.setdefault("metadata", {})
            annotations = meta.get("annotations", {})
            origin = yaml.safe_load(annotations.pop(ORIGIN, "path: ?"))["path"]
            if not annotations:
                meta.pop("annotations", None)
            out.append(Resource(obj, rel(Path(tmp, origin))))
    return out


def split_image(ref: str) -> tuple[str, str]:
    """'registry:5000/ns/srtrain:0.1.0@sha256:...' -> ('registry:5000/ns/srtrain', '0.1.0')."""
    name = ref.partition("@")[0]
    head, sep, tag = name.rpartition(":")
    if sep and "/" not in tag:
        return head, tag
    return name, ""


REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
# Vendored from ray-project/kuberay (tests/schemas/kuberay/README.md), so a bare clone checks too.
SCHEMAS = Path(__file__).resolve().parent / "schemas" / "kuberay"
KUBERNETES_VERSION = "1.30.0"
GPU = "nvidia.com/gpu"
SECRETISH = re.compile(r"(?i)secret|password|passwd|token|access_key|credential|private_key")
PLACEHOLDER = re.compile(r"^<[^<>]+>$")


# --- what the repository says -------------------------------------------------------------------


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def ray_pin() -> SpecifierSet:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"ray(\[|=|<|>|~|\s|$)", d)]
    return SpecifierSet(re.sub(r"^ray(\[[^\]]*\])?", "", spec).strip())


def locked_ray_version() -> str:
    (version,) = re.findall(r"(?im)^ray==(\S+)$", (REPO / "constraints.txt").read_text())
    return version


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def dockerfile_arg(name: str) -> str:
    (value,) = re.findall(rf"(?m)^ARG {name}=(\S*)", dockerfile())
    return value


def image_workdir() -> str:
    return re.findall(r"(?m)^WORKDIR (\S+)", dockerfile())[-1]


def manifest_files() -> list[Path]:
    """Every YAML file in k8s/ except kustomizations and components."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomization_roots() -> list[str]:
    """Directories under k8s/ that `kubectl kustomize` builds (kind Kustomization, not Component),
    relative to k8s/: "base", "overlays/gpu", ..."""
    out = []
    for path in sorted(K8S.rglob("kustomization.yaml")):
        (doc,) = load_documents(path)
        if doc.get("kind", "Kustomization") == "Kustomization":
            out.append(str(path.parent.relative_to(K8S)))
    return out


OVERLAYS = [r.removeprefix("overlays/") for r in kustomization_roots() if r.startswith("overlays/")]


@functools.cache
def rendered_root(root: str) -> tuple[Resource, ...]:
    return tuple(kustomize(K8S / root))


def rendered(overlay: str) -> tuple[Resource, ...]:
    return rendered_root(f"overlays/{overlay}")


def all_resources() -> list[Resource]:
    """Every resource of every kustomization (as kustomize builds it) and of every file in k8s/ as
    written (which includes the Secret template that no kustomization applies)."""
    out = [copy.deepcopy(r) for root in kustomization_roots() for r in rendered_root(root)]
    for path in manifest_files():
        out += [Resource(doc, rel(path)) for doc in load_documents(path)]
    return out


def label(r: Resource) -> str:
    return f"{r.origin}: {r.obj.get('kind')}/{r.obj.get('metadata', {}).get('name')}"


# --- walking KubeRay resources ------------------------------------------------------------------


def cluster_spec(r: Resource) -> tuple[str, dict] | None:
    if r.obj.get("kind") == "RayCluster":
        return "spec", r.obj.get("spec", {})
    if r.obj.get("kind") == "RayJob" and "rayClusterSpec" in r.obj.get("spec", {}):
        return "spec.rayClusterSpec", r.obj["spec"]["rayClusterSpec"]
    return None


def pod_templates(r: Resource) -> list[tuple[str, str, dict]]:
    """(field path, role, pod template) for every pod a KubeRay resource creates."""
    out = []
    found = cluster_spec(r)
    if found:
        prefix, spec = found
        out.append(
            (
                f"{prefix}.headGroupSpec.template",
                "head",
                spec.get("headGroupSpec", {}).get("template", {}),
            )
        )
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            out.append(
                (f"{prefix}.workerGroupSpecs[{i}].template", "worker", group.get("template", {}))
            )
    if r.obj.get("kind") == "RayJob" and "submitterPodTemplate" in r.obj.get("spec", {}):
        out.append(
            ("spec.submitterPodTemplate", "submitter", r.obj["spec"]["submitterPodTemplate"])
        )
    return out


def containers(template: dict) -> list[tuple[str, dict]]:
    spec = template.get("spec", {})
    return [
        (f"spec.{key}[{i}]", c)
        for key in ("initContainers", "containers")
        for i, c in enumerate(spec.get(key, []))
    ]


SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: Any) -> float:
    """A Kubernetes quantity ("500m", "8", "48Gi") as a number; raises ValueError if malformed."""
    number, suffix = re.fullmatch(r"([0-9.]+(?:[eE][-+]?\d+)?)([a-zA-Z]*)", str(value)).groups()
    return float(number) * SUFFIXES[suffix] if suffix else float(number)


# --- schema validation --------------------------------------------------------------------------


@functools.cache
def crd_schema(kind: str) -> dict:
    # The CRDs are 1.5 MB of YAML: the C loader reads them in a fraction of the pure-Python time.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _dotted(path) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def unknown_fields(instance: Any, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare, in every object whose schema lists its properties.

    CRD schemas rarely say additionalProperties: false (the API server prunes unknown fields
    silently), so a misspelled field passes plain JSON-schema validation; this is the strict check.
    """
    if not isinstance(schema, dict):
        return []
    branches = [
        schema,
        *schema.get("allOf", []),
        *schema.get("anyOf", []),
        *schema.get("oneOf", []),
    ]
    if isinstance(instance, dict):
        props: dict = {}
        for b in branches:
            props.update(b.get("properties", {}))
        extra = schema.get("additionalProperties")
        out = []
        for key, value in instance.items():
            here = f"{path}.{key}" if path else key
            if key in props:
                out += unknown_fields(value, props[key], here)
            elif isinstance(extra, dict):
                out += unknown_fields(value, extra, here)
            elif props or extra is False:
                out.append(f"{here}: unknown field (known: {', '.join(sorted(props))})")
        return out
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [
            p
            for i, v in enumerate(instance)
            for p in unknown_fields(v, schema["items"], f"{path}[{i}]")
        ]
    return []


OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName"}


def crd_problems(r: Resource) -> list[str]:
    schema = crd_schema(r.obj["kind"])
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{_dotted(e.absolute_path)}: {e.message}" for e in validator.iter_errors(r.obj)]
    problems += unknown_fields(r.obj, schema)
    problems += [
        f"metadata.{k}: unknown or server-set field"
        for k in r.obj.get("metadata", {})
        if k not in OBJECT_META
    ]
    return [f"{label(r)}: {p}" for p in problems]


def core_problems(r: Resource) -> list[str]:
    try:
        kubernetes_validate.validate(r.obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{label(r)}: {_dotted(e.absolute_path)}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{label(r)}: {e.message}"]
    return []


def is_kuberay(r: Resource) -> bool:
    return r.obj.get("apiVersion", "").startswith("ray.io/")


def is_prometheus(r: Resource) -> bool:
    return r.obj.get("apiVersion", "").startswith("monitoring.coreos.com/")


def is_core(r: Resource) -> bool:
    """A kind whose schema kubernetes-validate bundles (not a custom resource)."""
    return not (is_kuberay(r) or is_prometheus(r))


# --- security and resources ---------------------------------------------------------------------


def container_problems(r: Resource) -> list[str]:
    """Every container: cpu and memory requests and limits, requests = limits, non-root, no
    privilege escalation. KubeRay's autoscaler sidecar counts as a container."""
    problems = []
    checks: list[tuple[str, dict, dict]] = []
    for tpath, _, template in pod_templates(r):
        pod_sc = template.get("spec", {}).get("securityContext", {})
        checks += [(f"{tpath}.{cpath}", c, pod_sc) for cpath, c in containers(template)]
        if not containers(template):
            problems.append(f"{tpath}.spec.containers: no containers")
    found = cluster_spec(r)
    if found and found[1].get("enableInTreeAutoscaling"):
        checks.append((f"{found[0]}.autoscalerOptions", found[1].get("autoscalerOptions", {}), {}))
    for path, c, pod_sc in checks:
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for name in ("cpu", "memory"):
                if name not in res.get(kind, {}):
                    problems.append(f"{path}.resources.{kind}.{name}: missing")
        for name, value in res.get("limits", {}).items():
            if name in res.get("requests", {}) and quantity(res["requests"][name]) != quantity(
                value
            ):
                problems.append(
                    f"{path}.resources.requests.{name}: {res['requests'][name]} "
                    f"differs from the limit {value}"
                )
        sc = c.get("securityContext", {})
        if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
            problems.append(f"{path}.securityContext.runAsNonRoot: must be true")
        if sc.get("runAsUser", pod_sc.get("runAsUser", 1)) == 0:
            problems.append(f"{path}.securityContext.runAsUser: must not be 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{path}.securityContext.allowPrivilegeEscalation: must be false")
        if sc.get("privileged"):
            problems.append(f"{path}.securityContext.privileged: must not be true")
    return [f"{label(r)}: {p}" for p in problems]


def credential_problems(r: Resource) -> list[str]:
    """Credentials come from a Secret (secretKeyRef / envFrom), never as literal values."""
    problems = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "env" in node and isinstance(node["env"], list):
                for i, var in enumerate(node["env"]):
                    if SECRETISH.search(str(var.get("name", ""))) and "value" in var:
                        problems.append(
                            f"{path}.env[{i}].value: literal value for {var['name']}; "
                            "use valueFrom.secretKeyRef or envFrom"
                        )
            for k, v in node.items():
                walk(v, f"{path}.{k}" if path else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")

    walk(r.obj, "")
    if r.obj.get("kind") == "Secret":
        if r.obj.get("data"):
            problems.append("data: a committed Secret may only hold placeholders in stringData")
        for key, value in r.obj.get("stringData", {}).items():
            if not PLACEHOLDER.match(str(value)):
                problems.append(f"stringData.{key}: {value!r} is not a <placeholder>")
    return [f"{label(r)}: {p}" for p in problems]


SECRET_TEXT = [
    re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),  # AWS access key ids
    re.compile(
        r"(?i)(secret|password|token|access_key)\w*[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}"
    ),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


# --- commands, jobs and GPUs --------------------------------------------------------------------


def commands(text: str) -> list[tuple[str, list[str]]]:
    """`python -m MODULE args...` invocations in a shell command line."""
    out = []
    words = shlex.split(text, comments=True)
    for i, w in enumerate(words):
        if re.fullmatch(r"(\S*/)?python(3(\.\d+)?)?", w) and words[i + 1 : i + 2] == ["-m"]:
            args = []
            for a in words[i + 3 :]:
                if a in ("&&", "||", ";", "|"):
                    break
                args.append(a)
            out.append((words[i + 2], args))
    return out


def parse_job_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(--config, overrides) of srtrain.run / tune.search arguments; --output is run.storage."""
    config, overrides, it = None, [], iter(args)
    for a in it:
        key, eq, value = a.partition("=")
        if key in ("--config", "--set", "--output"):
            value = value if eq else next(it, "")
            if key == "--config":
                config = value
            elif key == "--set":
                overrides.append(value)
            else:
                overrides.append(f"run.storage={value}")
    return config, overrides


def job_references(r: Resource) -> list[tuple[str, str, str, list[str]]]:
    """(field path, module, job path, overrides) for every job a resource runs or is sized for."""
    out = []
    if r.obj.get("kind") == "RayJob":
        for module, args in commands(r.obj.get("spec", {}).get("entrypoint", "")):
            config, overrides = parse_job_args(args)
            if config is not None:
                out.append(("spec.entrypoint", module, config, overrides))
    annotated = r.obj.get("metadata", {}).get("annotations", {}).get("srtrain.io/jobs", "")
    for path in filter(None, (p.strip() for p in annotated.split(","))):
        module = "tune.search" if Path(path).name.startswith("tune-") else "srtrain.run"
        out.append(("metadata.annotations[srtrain.io/jobs]", module, path, []))
    return out


def repo_path(job_path: str) -> Path | str:
    """A job path as the Ray driver sees it in the image -> the file in this repository, or a
    problem. Relative paths are wrong: the driver's working directory is not the image WORKDIR."""
    workdir = image_workdir().rstrip("/") + "/"
    if not job_path.startswith("/"):
        return f"{job_path!r} is relative; use an absolute path under the image WORKDIR {workdir}"
    if not job_path.startswith(workdir):
        return f"{job_path!r} is outside the image WORKDIR {workdir} (Dockerfile)"
    return REPO / job_path[len(workdir) :]


def tune_available() -> bool:
    try:
        return importlib.util.find_spec("tune.search") is not None
    except ImportError:
        return False


def load_job(module: str, path: Path, overrides: list[str]) -> Config:
    if module == "tune.search":
        from tune.search import load_search_job

        return load_search_job(path, overrides)[0]
    return load_config(path, overrides)


def job_problems(r: Resource, modules: set[str]) -> tuple[list[str], dict[str, Config]]:
    """Problems with the job files `r` references (entry points in `modules`), and their configs."""
    problems, configs = [], {}
    for field, module, job_path, overrides in job_references(r):
        if module not in modules:
            continue
        target = repo_path(job_path)
        if isinstance(target, str):
            problems.append(f"{label(r)}: {field}: {target}")
        elif not target.is_file():
            problems.append(
                f"{label(r)}: {field}: job file {job_path} does not exist "
                f"({rel(target)} is missing from the repository and so the image)"
            )
        else:
            try:
                configs[f"{field}:{job_path}"] = load_job(module, target, overrides)
            except ConfigError as e:
                problems.append(f"{label(r)}: {field}: {job_path} fails validation: {e}")
    return problems, configs


def gpu_limit(container: dict) -> int:
    return int(quantity(container.get("resources", {}).get("limits", {}).get(GPU, 0)))


def gpu_problems(r: Resource, modules: set[str]) -> list[str]:
    """Worker pods hold exactly scaling.gpus_per_worker GPUs (one Ray Train worker per GPU set),
    the head none, and the worker groups can host scaling.num_workers workers."""
    problems, configs = job_problems(r, modules)
    found = cluster_spec(r)
    if found is None or not configs:
        return problems
    prefix, spec = found
    head = spec.get("headGroupSpec", {})
    for cpath, c in containers(head.get("template", {})):
        if gpu_limit(c):
            problems.append(
                f"{label(r)}: {prefix}.headGroupSpec.template.{cpath}.resources.limits."
                f"{GPU}: the head runs no training worker and needs no GPU"
            )
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for where, cfg in configs.items():
        s = cfg.scaling
        capacity = 0
        head_cpus = quantity(head.get("rayStartParams", {}).get("num-cpus", "0"))
        if s.gpus_per_worker == 0:
            capacity += int(head_cpus // s.cpus_per_worker)
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            gpath = f"{prefix}.workerGroupSpecs[{i}]"
            pod_cpus = 0.0
            for cpath, c in containers(group.get("template", {})):
                field = f"{gpath}.template.{cpath}.resources.limits.{GPU}"
                if gpu_limit(c) != s.gpus_per_worker:
                    got = c.get("resources", {}).get("limits", {}).get(GPU, "missing")
                    problems.append(
                        f"{label(r)}: {field}: {got}, but scaling.gpus_per_worker is "
                        f"{s.gpus_per_worker} in {where.split(':', 1)[1]}"
                    )
                if gpu_limit(c):
                    requested = c.get("resources", {}).get("requests", {}).get(GPU)
                    if requested is None or quantity(requested) != gpu_limit(c):
                        problems.append(
                            f"{label(r)}: {gpath}.template.{cpath}.resources.requests."
                            f"{GPU}: must equal the limit"
                        )
                pod_cpus += quantity(c.get("resources", {}).get("limits", {}).get("cpu", 0))
            cpus = quantity(group.get("rayStartParams", {}).get("num-cpus", pod_cpus))
            per_pod = int(cpus // s.cpus_per_worker)
            if s.gpus_per_worker:
                per_pod = min(per_pod, gpu_limit_of_group(group) // s.gpus_per_worker)
            pods = group.get("maxReplicas" if autoscaling else "replicas", 0)
            capacity += per_pod * pods
        if capacity < s.num_workers:
            problems.append(
                f"{label(r)}: {prefix}.workerGroupSpecs: room for {capacity} Ray Train "
                f"workers, but {where.split(':', 1)[1]} needs scaling.num_workers="
                f"{s.num_workers} x {s.gpus_per_worker} GPU x {s.cpus_per_worker} CPU"
            )
    return problems


def gpu_limit_of_group(group: dict) -> int:
    return sum(gpu_limit(c) for _, c in containers(group.get("template", {})))


def production_problems(r: Resource) -> list[str]:
    """What the GPU overlay promises beyond validity: a head that schedules nothing, GPU workers
    that tolerate GPU taints and have a memory-backed /dev/shm, bounded autoscaling."""
    found = cluster_spec(r)
    if found is None:
        return []
    prefix, spec = found
    problems = []
    if spec.get("headGroupSpec", {}).get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(
            f'{prefix}.headGroupSpec.rayStartParams.num-cpus: must be "0" (no tasks on the head)'
        )
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        gpath = f"{prefix}.workerGroupSpecs[{i}]"
        if not gpu_limit_of_group(group):
            continue
        pod = group.get("template", {}).get("spec", {})
        if not any(t.get("key") == GPU for t in pod.get("tolerations", [])):
            problems.append(f"{gpath}.template.spec.tolerations: no toleration for {GPU}")
        shm = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("emptyDir", {}).get("medium") == "Memory"
        }
        mounts = [m for _, c in containers(group["template"]) for m in c.get("volumeMounts", [])]
        if not any(m.get("mountPath") == "/dev/shm" and m.get("name") in shm for m in mounts):
            problems.append(f"{gpath}.template.spec.volumes: /dev/shm is not a memory emptyDir")
        lo, n, hi = group.get("minReplicas"), group.get("replicas"), group.get("maxReplicas")
        if None in (lo, n, hi) or not lo <= n <= hi or hi < 1:
            problems.append(
                f"{gpath}: needs minReplicas <= replicas <= maxReplicas, maxReplicas >= 1"
            )
    if r.obj["kind"] == "RayCluster" and not spec.get("enableInTreeAutoscaling"):
        problems.append("spec.enableInTreeAutoscaling: the long-lived cluster must autoscale")
    if r.obj["kind"] == "RayJob":
        js = r.obj["spec"]
        for key in (
            "shutdownAfterJobFinishes",
            "ttlSecondsAfterFinished",
            "activeDeadlineSeconds",
            "backoffLimit",
        ):
            if key not in js:
                problems.append(f"spec.{key}: missing")
        if js.get("shutdownAfterJobFinishes") is not True:
            problems.append("spec.shutdownAfterJobFinishes: must be true (ephemeral cluster)")
    return [f"{label(r)}: {p}" for p in problems]


# --- what the entrypoints promise ---------------------------------------------------------------


def entrypoint_problems(r: Resource) -> list[str]:
    """A RayJob's training or search command carries a fixed --name and --resume, so a retry
    (backoffLimit: a new cluster) continues the same run instead of starting another."""
    if r.obj.get("kind") != "RayJob":
        return []
    problems = []
    for module, args in commands(r.obj["spec"].get("entrypoint", "")):
        names = [
            a.split("=", 1)[1] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            for i, a in enumerate(args)
            if a == "--name" or a.startswith("--name=")
        ]
        if len(names) != 1 or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", names[0]):
            problems.append(
                f"spec.entrypoint: python -m {module}: needs one fixed --name, got {names}"
            )
        if "--resume" not in args:
            problems.append(f"spec.entrypoint: python -m {module}: no --resume")
    return [f"{label(r)}: {p}" for p in problems]


def lifecycle_problems(r: Resource) -> list[str]:
    """A RayJob fails within preRunningDeadlineSeconds if it cannot start, and a cluster that shuts
    down after the job does so within a minute (the submitter Job keeps the driver's logs)."""
    if r.obj.get("kind") != "RayJob":
        return []
    js, problems = r.obj["spec"], []
    deadline = js.get("preRunningDeadlineSeconds")
    if not isinstance(deadline, int) or not 0 < deadline <= 3600:
        problems.append(f"spec.preRunningDeadlineSeconds: {deadline!r}, want 1..3600")
    elif deadline >= js.get("activeDeadlineSeconds", deadline + 1):
        problems.append("spec.preRunningDeadlineSeconds: not below activeDeadlineSeconds")
    ttl = js.get("ttlSecondsAfterFinished", 0)
    if js.get("shutdownAfterJobFinishes") and ttl > 60:
        problems.append(f"spec.ttlSecondsAfterFinished: {ttl}, at most 60 (the cluster idles)")
    if not js.get("shutdownAfterJobFinishes") and ttl:
        problems.append("spec.ttlSecondsAfterFinished: set, but the cluster is never shut down")
    return [f"{label(r)}: {p}" for p in problems]


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var.get("name") == name:
            return var.get("value")
    return None


def gpu_visibility_problems(r: Resource) -> list[str]:
    """The head and the submitter see no GPU (the CUDA image exposes all of a node's GPUs to any
    container that does not hide them) and advertise none to Ray; GPU workers see theirs."""
    problems = []
    found = cluster_spec(r)
    if found:
        prefix, spec = found
        params = spec.get("headGroupSpec", {}).get("rayStartParams", {})
        if params.get("num-gpus") != "0":
            problems.append(f'{prefix}.headGroupSpec.rayStartParams.num-gpus: must be "0"')
    for tpath, role, template in pod_templates(r):
        for cpath, c in containers(template):
            value = env_value(c, "NVIDIA_VISIBLE_DEVICES")
            if role in ("head", "submitter") and value != "void":
                problems.append(f"{tpath}.{cpath}.env[NVIDIA_VISIBLE_DEVICES]: {value}, want void")
            if role == "worker" and gpu_limit(c) and value is not None:
                problems.append(f"{tpath}.{cpath}.env[NVIDIA_VISIBLE_DEVICES]: hides its GPUs")
    return [f"{label(r)}: {p}" for p in problems]


GPU_MODEL_LABELS = ("nvidia.com/gpu.product", "cloud.google.com/gke-accelerator")


def gpu_model_selectors(resources: list[Resource]) -> tuple[set[tuple], list[str]]:
    """The GPU-model nodeSelector of every GPU worker group, and the groups without one."""
    models, problems = set(), []
    for r in resources:
        found = cluster_spec(r)
        if not found:
            continue
        for i, group in enumerate(found[1].get("workerGroupSpecs", [])):
            if not gpu_limit_of_group(group):
                continue
            selector = group.get("template", {}).get("spec", {}).get("nodeSelector", {})
            pinned = {(k, v) for k, v in selector.items() if k in GPU_MODEL_LABELS}
            if not pinned:
                problems.append(
                    f"{label(r)}: {found[0]}.workerGroupSpecs[{i}].template.spec.nodeSelector: "
                    f"no GPU model ({' or '.join(GPU_MODEL_LABELS)})"
                )
            models |= pinned
    return models, problems


# --- the Prometheus PodMonitor (no schema here: checked structurally) ---------------------------

KUBERAY_NODE_TYPES = {"head", "worker"}  # values of the ray.io/node-type label KubeRay sets
PODMONITOR_SPEC = {
    "selector",
    "podMetricsEndpoints",
    "jobLabel",
    "namespaceSelector",
    "podTargetLabels",
    "sampleLimit",
}
PODMONITOR_ENDPOINT = {
    "port",
    "path",
    "interval",
    "scrapeTimeout",
    "scheme",
    "relabelings",
    "metricRelabelings",
    "honorLabels",
}


def ray_pods(resources: list[Resource]) -> list[tuple[str, str, dict, dict]]:
    """(where, node type, pod template, rayStartParams) of every head and worker pod."""
    out = []
    for r in resources:
        found = cluster_spec(r)
        if not found:
            continue
        prefix, spec = found
        head = spec.get("headGroupSpec", {})
        out.append(
            (
                f"{label(r)}: {prefix}.headGroupSpec",
                "head",
                head.get("template", {}),
                head.get("rayStartParams", {}),
            )
        )
        for i, g in enumerate(spec.get("workerGroupSpecs", [])):
            out.append(
                (
                    f"{label(r)}: {prefix}.workerGroupSpecs[{i}]",
                    "worker",
                    g.get("template", {}),
                    g.get("rayStartParams", {}),
                )
            )
    return out


def podmonitor_problems(pm: Resource, resources: list[Resource]) -> list[str]:
    """The PodMonitor is well-formed, selects every Ray head and worker pod of `resources` (by the
    labels in their templates plus KubeRay's ray.io/node-type) and no other pod, and each selected
    pod has the scraped port, which is Ray's metrics export port there."""
    obj, problems = pm.obj, []
    if obj.get("apiVersion") != "monitoring.coreos.com/v1" or obj.get("kind") != "PodMonitor":
        problems.append(f"apiVersion/kind: {obj.get('apiVersion')}/{obj.get('kind')}")
    spec = obj.get("spec", {})
    problems += [f"spec.{k}: unknown field" for k in set(spec) - PODMONITOR_SPEC]
    endpoints = spec.get("podMetricsEndpoints", [])
    if not endpoints:
        problems.append("spec.podMetricsEndpoints: empty")
    for i, ep in enumerate(endpoints):
        problems += [
            f"spec.podMetricsEndpoints[{i}].{k}: unknown field"
            for k in set(ep) - PODMONITOR_ENDPOINT
        ]
    selector = spec.get("selector", {})
    problems += [
        f"spec.selector.{k}: unknown field"
        for k in set(selector) - {"matchLabels", "matchExpressions"}
    ]
    match, node_types = selector.get("matchLabels", {}), set(KUBERAY_NODE_TYPES)
    for i, e in enumerate(selector.get("matchExpressions", [])):
        if e.get("key") != "ray.io/node-type" or e.get("operator") != "In":
            problems.append(f"spec.selector.matchExpressions[{i}]: only ray.io/node-type In ...")
        else:
            node_types &= set(e.get("values", []))
    if not match:
        problems.append("spec.selector.matchLabels: empty (would select every pod)")
    for where, node_type, template, params in ray_pods(resources):
        pod_labels = template.get("metadata", {}).get("labels", {})
        if node_type not in node_types or any(pod_labels.get(k) != v for k, v in match.items()):
            problems.append(f"spec.selector: does not select {where} (labels {pod_labels})")
            continue
        ports = {
            p.get("name"): p.get("containerPort")
            for _, c in containers(template)
            for p in c.get("ports", [])
        }
        for i, ep in enumerate(endpoints):
            want = int(params.get("metrics-export-port", 8080))
            if ports.get(ep.get("port")) != want:
                problems.append(
                    f"spec.podMetricsEndpoints[{i}].port: {ep.get('port')!r} is "
                    f"{ports.get(ep.get('port'))} in {where}, not Ray's metrics port {want}"
                )
    for r in resources:
        for tpath, role, template in pod_templates(r):
            pod_labels = template.get("metadata", {}).get("labels", {})
            if role == "submitter" and all(pod_labels.get(k) == v for k, v in match.items()):
                # the submitter has no ray.io/node-type label: only the expression keeps it out
                if not selector.get("matchExpressions"):
                    problems.append(f"spec.selector: also selects {label(r)}: {tpath}")
    return [f"{label(pm)}: {p}" for p in problems]


# --- commands quoted in the documentation -------------------------------------------------------

DOCS = ["k8s/README.md", "README.md"]


def shell_snippets(markdown: str) -> list[str]:
    """Shell lines of a Markdown file: fenced sh/bash/console blocks (continuations joined) and
    inline code spans."""
    out = []
    for block in re.findall(r"(?ms)^```(?:sh|bash|shell|console)\n(.*?)^```", markdown):
        out += [x.strip() for x in block.replace("\\\n", " ").splitlines() if x.strip()]
    out += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", markdown)
    return out


def manifest_commands(markdown: str) -> list[str]:
    """Every command of a Markdown file that renders or applies a kustomization."""
    rx = re.compile(r"\bkubectl\s+(kustomize\s|(apply|delete|diff|create)\s+(\S+\s+)*-k\s)")
    return [s for s in shell_snippets(markdown) if rx.search(s)]


def label_selector(text: str) -> list[tuple[str, set[str]]]:
    """`k=v`, `k in (a,b)`, comma-separated -> [(k, {allowed values})]."""
    out = []
    for term in re.findall(r"[\w./-]+\s+in\s+\([^)]*\)|[^,]+", text):
        m = re.fullmatch(r"\s*([\w./-]+)\s+in\s+\(([^)]*)\)\s*", term)
        if m:
            out.append((m.group(1), {v.strip() for v in m.group(2).split(",")}))
            continue
        m = re.fullmatch(r"\s*([\w./-]+)\s*==?\s*([\w.-]+)\s*", term)
        if not m:
            raise ValueError(f"label selector {text!r}: {term!r} is not k=v or k in (...)")
        out.append((m.group(1), {m.group(2)}))
    return out


def selects(selector: list[tuple[str, set[str]]], obj: dict) -> bool:
    labels = obj.get("metadata", {}).get("labels", {})
    return all(labels.get(k) in allowed for k, allowed in selector)


def kubectl_words(command: str) -> list[str]:
    """The words of the first `kubectl ...` of a shell line, up to a pipe or a command separator."""
    words = shlex.split(command, comments=True)
    i = words.index("kubectl")
    out = []
    for w in words[i + 1 :]:
        if w in ("|", "||", "&&", ";", "&"):
            break
        out.append(w)
    return out


def option(words: list[str], *names: str) -> str | None:
    for i, w in enumerate(words):
        for n in names:
            if w == n and i + 1 < len(words):
                return words[i + 1]
            if w.startswith(n + "="):
                return w.split("=", 1)[1]
    return None
