"""The Kubernetes deployment (k8s/, Dockerfile, jobs/iaprtc12-*.yaml) is valid and matches the code.

No cluster or container engine is needed: overlays are rendered by tests/k8s_render.py, KubeRay
resources are validated against the operator's CRD schemas in ../shared/k8s-schemas/kuberay (with
unknown fields rejected, as `kubectl apply --validate=strict` does), core kinds with
kubernetes-validate --strict, and every command, job file, image tag, Ray version and GPU count the
manifests name is checked against the repository. Each checker returns problems as
"<file>: <Kind>/<name>: <field path>: <what is wrong>", and the mutation tests at the end prove that
a broken manifest is reported that way.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from k8s_render import RenderError, Resource, load_documents, rel, render, split_image
from packaging.specifiers import SpecifierSet

from srtrain.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "k8s-schemas" / "kuberay"
OVERLAYS = ["gpu", "cpu-dev"]
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
    return sorted(p for p in K8S.rglob("*.yaml"))


@functools.cache
def rendered(overlay: str) -> tuple[Resource, ...]:
    return tuple(render(K8S / "overlays" / overlay))


def all_resources() -> list[Resource]:
    """Every resource of every overlay (rendered) and of every file in k8s/ as written."""
    out = [copy.deepcopy(r) for o in OVERLAYS for r in rendered(o)]
    for path in manifest_files():
        if path.name != "kustomization.yaml":
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


# ================================================================================================
# Tests
# ================================================================================================


needs_schemas = pytest.mark.skipif(
    not SCHEMAS.is_dir(), reason=f"KubeRay CRDs not found at {SCHEMAS}"
)
needs_tune = pytest.mark.skipif(
    not tune_available(), reason="the tune package (tune.search) is not importable yet"
)


def test_every_manifest_parses():
    for path in manifest_files():
        docs = load_documents(path)
        assert docs, f"{rel(path)}: no YAML documents"
        for i, doc in enumerate(docs):
            for key in ("apiVersion", "kind"):
                assert key in doc, f"{rel(path)}: document {i}: {key}: missing"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    kinds = sorted(r.obj["kind"] for r in rendered(overlay))
    assert "RayJob" in kinds, f"k8s/overlays/{overlay}: renders no RayJob ({kinds})"
    namespaces = {r.obj["metadata"].get("namespace") for r in rendered(overlay)}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: namespaces {namespaces}"


def test_overlays_differ_as_documented():
    gpu = {r.id[0] + "/" + r.id[2] for r in rendered("gpu")}
    dev = {r.id[0] + "/" + r.id[2] for r in rendered("cpu-dev")}
    assert {"RayCluster/srtrain", "RayJob/srtrain-train", "RayJob/srtrain-tune"} <= gpu
    assert dev == {"ServiceAccount/srtrain", "RayJob/srtrain-train"}
    for r in rendered("cpu-dev"):
        for tpath, _, template in pod_templates(r):
            for cpath, c in containers(template):
                assert not gpu_limit(c), f"{label(r)}: {tpath}.{cpath}: a GPU in the CPU overlay"


def test_renderer_rejects_a_patch_that_does_not_apply(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "job.yaml").write_text((K8S / "rayjob-train.yaml").read_text())
    (tmp_path / "base" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [job.yaml]\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [base]\n"
        "patches:\n- target: {kind: RayJob, name: srtrain-train}\n"
        "  patch: '[{op: replace, path: /spec/entrypointt, value: x}]'\n"
    )
    with pytest.raises(RenderError, match=r"patches\[0\].*entrypointt"):
        render(tmp_path)


@needs_schemas
def test_kuberay_resources_match_the_crd_schemas():
    checked = [r for r in all_resources() if is_kuberay(r)]
    assert {r.obj["kind"] for r in checked} == {"RayCluster", "RayJob"}
    problems = [p for r in checked for p in crd_problems(r)]
    assert not problems, "\n".join(problems)


def test_core_resources_validate_strictly():
    checked = [r for r in all_resources() if not is_kuberay(r)]
    assert {"ServiceAccount", "Secret"} <= {r.obj["kind"] for r in checked}
    problems = [p for r in checked for p in core_problems(r)]
    assert not problems, "\n".join(problems)


def test_every_container_has_resources_and_a_non_root_security_context():
    problems = [p for r in all_resources() for p in container_problems(r)]
    assert not problems, "\n".join(problems)


def test_no_plaintext_credentials_in_k8s_or_jobs():
    problems = [p for r in all_resources() for p in credential_problems(r)]
    for path in sorted([*K8S.rglob("*"), *(REPO / "jobs").rglob("*"), REPO / "Dockerfile"]):
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                problems += [
                    f"{rel(path)}:{n}: looks like a credential: {line.strip()}"
                    for rx in SECRET_TEXT
                    if rx.search(line)
                ]
    assert not re.search(r"(?m)^(ENV|ARG)\s+\S*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", dockerfile())
    assert not problems, "\n".join(problems)


def test_pods_read_s3_credentials_from_the_secret():
    example = load_documents(K8S / "s3-credentials.example.yaml")[0]
    for r in rendered("gpu"):
        for tpath, role, template in pod_templates(r):
            if role == "submitter":
                continue
            for cpath, c in containers(template):
                refs = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
                assert example["metadata"]["name"] in refs, (
                    f"{label(r)}: {tpath}.{cpath}.envFrom: does not load Secret "
                    f"{example['metadata']['name']}"
                )


def entrypoint_modules() -> list[str]:
    """Every project `python -m X` in k8s/ (manifests and README) and our GPU jobs' first lines."""
    text = "\n".join(p.read_text() for p in [*manifest_files(), K8S / "README.md"])
    text += "\n".join((REPO / "jobs" / f).read_text().splitlines()[0] for f in OWN_JOBS)
    found = set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text))
    return sorted(m for m in found if m.split(".")[0] in ("srtrain", "tune"))


OWN_JOBS = ["iaprtc12-base.yaml", "iaprtc12-advanced.yaml"]


@pytest.mark.parametrize("module", entrypoint_modules())
def test_entrypoint_module_exists_and_its_help_runs(module):
    proc = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (
        f"python -m {module} --help exited {proc.returncode}:\n{proc.stderr}"
    )
    assert "usage" in proc.stdout.lower(), f"python -m {module} --help printed no usage"


def test_train_jobs_referenced_by_manifests_exist_and_validate():
    refs = [r for r in all_resources() for ref in job_references(r) if ref[1] == "srtrain.run"]
    assert refs, "no manifest runs srtrain.run"
    problems = [p for r in refs for p in job_problems(r, {"srtrain.run"})[0]]
    assert not problems, "\n".join(problems)


@needs_tune
def test_tune_jobs_referenced_by_manifests_exist_and_validate():
    refs = [r for r in all_resources() for ref in job_references(r) if ref[1] == "tune.search"]
    assert refs, "no manifest runs tune.search"
    problems = [p for r in refs for p in job_problems(r, {"tune.search"})[0]]
    assert not problems, "\n".join(problems)


def test_every_entrypoint_is_a_known_module():
    for r in all_resources():
        if r.obj.get("kind") == "RayJob":
            found = commands(r.obj["spec"]["entrypoint"])
            assert [m for m, _ in found] and all(
                m in ("srtrain.run", "tune.search") for m, _ in found
            ), f"{label(r)}: spec.entrypoint: {r.obj['spec']['entrypoint']!r}"


def test_gpu_counts_match_the_train_jobs():
    problems = [p for o in OVERLAYS for r in rendered(o) for p in gpu_problems(r, {"srtrain.run"})]
    assert not problems, "\n".join(problems)


@needs_tune
def test_gpu_counts_match_the_tune_jobs():
    problems = [p for o in OVERLAYS for r in rendered(o) for p in gpu_problems(r, {"tune.search"})]
    assert not problems, "\n".join(problems)


def test_gpu_overlay_is_production_ready():
    problems = [p for r in rendered("gpu") for p in production_problems(r)]
    assert not problems, "\n".join(problems)


def test_image_tags_match_the_project_version():
    version = project_version()
    assert dockerfile_arg("SRTRAIN_VERSION") == version, "Dockerfile: ARG SRTRAIN_VERSION"
    problems = []
    for r in all_resources():
        found = [
            (f"{t}.{c}", cont["image"])
            for t, _, tmpl in pod_templates(r)
            for c, cont in containers(tmpl)
        ]
        if not found and is_kuberay(r):
            problems.append(f"{label(r)}: no container images")
        for path, image in found:
            tag = split_image(image)[1]
            if tag != version and not tag.startswith(f"{version}-"):
                problems.append(f"{label(r)}: {path}.image: {image!r}, expected tag {version}")
        label_version = r.obj["metadata"].get("labels", {}).get("app.kubernetes.io/version")
        if label_version not in (None, version):
            problems.append(
                f"{label(r)}: metadata.labels[app.kubernetes.io/version]: {label_version}"
            )
    for overlay in OVERLAYS:
        path = K8S / "overlays" / overlay / "kustomization.yaml"
        for image in load_documents(path)[0].get("images", []):
            tag = str(image.get("newTag", ""))
            if tag != version and not tag.startswith(f"{version}-"):
                problems.append(f"{rel(path)}: images[{image['name']}].newTag: {tag!r}")
    assert not problems, "\n".join(problems)


def test_ray_versions_agree():
    locked = locked_ray_version()
    assert locked in ray_pin(), f"constraints.txt ray=={locked} is outside pyproject's {ray_pin()}"
    assert dockerfile_arg("RAY_VERSION") == locked, "Dockerfile: ARG RAY_VERSION != constraints.txt"
    assert re.search(
        r"(?m)^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-\$\{RAY_FLAVOR\}$", dockerfile()
    ), "Dockerfile: FROM is not Ray's py311 image at RAY_VERSION"
    assert dockerfile_arg("RAY_FLAVOR") == "gpu", (
        "Dockerfile: the default image must be the GPU one"
    )
    problems = []
    for r in all_resources():
        found = cluster_spec(r)
        if found and str(found[1].get("rayVersion")) != locked:
            problems.append(
                f"{label(r)}: {found[0]}.rayVersion: {found[1].get('rayVersion')!r}, "
                f"expected {locked} (constraints.txt, pyproject {ray_pin()})"
            )
    assert not problems, "\n".join(problems)


def test_dockerfile_installs_the_locked_project_as_non_root():
    text = dockerfile()
    install = [line for line in text.splitlines() if "pip install" in line]
    assert install and all("-c constraints.txt" in line for line in install), install
    assert dockerfile_arg("EXTRAS") == "gpu", "Dockerfile: the default image installs the gpu extra"
    assert '".${EXTRAS:+[${EXTRAS}]}"' in text, (
        "Dockerfile: the project is not installed with EXTRAS"
    )
    users = re.findall(r"(?m)^USER (\S+)", text)
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), (
        f"USER {users}: must be numeric non-root"
    )
    assert re.search(r"(?m)^COPY .*\bjobs \./jobs$", text), "Dockerfile: jobs/ is not in the image"
    # Build args declared before FROM are empty after it unless declared again.
    stage = text[text.index("\nFROM ") :]
    declared = set(re.findall(r"(?m)^ARG (\w+)", stage.split("\n", 2)[2])) | {"PATH", "HOME"}
    used = set(re.findall(r"\$\{(\w+)", stage.split("\n", 2)[2]))
    assert used <= declared, (
        f"Dockerfile: {sorted(used - declared)} used after FROM but not declared"
    )
    ignore = [x.strip() for x in (REPO / ".dockerignore").read_text().splitlines()]
    ignore = [x for x in ignore if x and not x.startswith("#")]
    assert ignore[0] == "*", ".dockerignore: must start from an empty context (allowlist)"
    for needed in ("pyproject.toml", "constraints.txt", "srtrain/", "tune/", "jobs/"):
        assert f"!{needed}" in ignore, f".dockerignore: {needed} is not in the build context"


@pytest.mark.parametrize("name", OWN_JOBS)
def test_gpu_job_files_state_their_command_and_the_original_recipe(name):
    path = REPO / "jobs" / name
    assert path.read_text().splitlines()[0] == f"# python -m srtrain.run --config jobs/{name}"
    cfg = load_config(path)
    assert cfg.model.arch == name.removeprefix("iaprtc12-").removesuffix(".yaml")
    assert (cfg.data.patch_size, cfg.data.batch_size, cfg.train.lr, cfg.train.epochs) == (
        256,
        8,
        5e-4,
        50,
    )
    assert (cfg.train.plateau_factor, cfg.train.plateau_patience, cfg.train.min_lr) == (
        0.2,
        3,
        1e-6,
    )
    assert cfg.train.early_stop_patience == 7
    assert cfg.data.source.startswith("s3://") and cfg.data.source.rstrip("/").endswith("/iaprtc12")
    assert cfg.run.storage.startswith("s3://"), "a multi-node run needs shared run storage"
    assert cfg.scaling.gpus_per_worker >= 1


# --- mutations: a broken manifest is reported with its file and field ---------------------------


def _gpu_train_job() -> Resource:
    (r,) = [copy.deepcopy(r) for r in rendered("gpu") if r.id[2] == "srtrain-train"]
    return r


WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0)
WORKER_PATH = "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0]"


def _at(obj: dict, keys: tuple) -> Any:
    for k in keys:
        obj = obj[k]
    return obj


@needs_schemas
def test_a_misspelled_field_is_reported_with_file_and_path():
    r = _gpu_train_job()
    worker = _at(r.obj, WORKER)
    worker["resurces"] = worker.pop("resources")
    problems = crd_problems(r)
    assert any(
        "k8s/rayjob-train.yaml" in p and f"{WORKER_PATH}.resurces: unknown field" in p
        for p in problems
    ), problems
    r = _gpu_train_job()
    r.obj["spec"]["shutdownAfterJobFinish"] = r.obj["spec"].pop("shutdownAfterJobFinishes")
    assert any("spec.shutdownAfterJobFinish: unknown field" in p for p in crd_problems(r))
    r = _gpu_train_job()
    _at(r.obj, WORKER)["resources"]["limits"]["cpu"] = "eight"
    assert any(f"{WORKER_PATH}.resources.limits.cpu" in p for p in crd_problems(r))


def test_a_missing_gpu_limit_is_reported_with_file_and_path():
    r = _gpu_train_job()
    del _at(r.obj, WORKER)["resources"]["limits"][GPU]
    problems = gpu_problems(r, {"srtrain.run"})
    assert any(
        "k8s/rayjob-train.yaml" in p
        and f"{WORKER_PATH}.resources.limits.{GPU}: missing" in p
        and "gpus_per_worker is 1" in p
        for p in problems
    ), problems
    r = _gpu_train_job()
    r.obj["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = 1
    assert any("needs scaling.num_workers=2" in p for p in gpu_problems(r, {"srtrain.run"}))


def test_a_nonexistent_job_path_is_reported_with_file_and_path():
    r = _gpu_train_job()
    r.obj["spec"]["entrypoint"] = r.obj["spec"]["entrypoint"].replace("advanced", "advnced")
    problems = job_problems(r, {"srtrain.run"})[0]
    assert any(
        "k8s/rayjob-train.yaml" in p
        and "spec.entrypoint" in p
        and "jobs/iaprtc12-advnced.yaml does not exist" in p
        for p in problems
    ), problems
    r = _gpu_train_job()
    r.obj["spec"]["entrypoint"] += " --set train.lr=-1"
    assert any(
        "spec.entrypoint" in p and "train.lr" in p for p in job_problems(r, {"srtrain.run"})[0]
    )
    r = _gpu_train_job()
    r.obj["spec"]["entrypoint"] = "python -m srtrain.run --config jobs/iaprtc12-advanced.yaml"
    assert any("is relative" in p for p in job_problems(r, {"srtrain.run"})[0])


def test_insecure_containers_and_literal_credentials_are_reported():
    r = _gpu_train_job()
    worker = _at(r.obj, WORKER)
    del worker["resources"]["requests"]["memory"]
    worker["securityContext"]["allowPrivilegeEscalation"] = True
    worker["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "not-a-secret"}]
    problems = container_problems(r) + credential_problems(r)
    for field in (
        "resources.requests.memory: missing",
        "securityContext.allowPrivilegeEscalation: must be false",
        "env[0].value: literal value for AWS_SECRET_ACCESS_KEY",
    ):
        assert any(
            f"{WORKER_PATH}.{field}" in p and "k8s/rayjob-train.yaml" in p for p in problems
        ), (field, problems)
    secret = Resource(load_documents(K8S / "s3-credentials.example.yaml")[0], "k8s/x.yaml")
    secret.obj["stringData"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert any("stringData.AWS_SECRET_ACCESS_KEY" in p for p in credential_problems(secret))
    assert any(
        rx.search("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        for rx in SECRET_TEXT
    )
