"""The Kubernetes deployment (k8s/, Dockerfile, jobs/iaprtc12-*.yaml) is valid, matches the code,
and every manifest command the documentation quotes works.

No cluster or container engine is needed: every kustomization is rendered by the kustomize inside
`kubectl` (`kubectl kustomize`; the tests skip, saying so, where kubectl is not on PATH), and the
checkers in tests/k8s_checks.py validate what it prints: KubeRay resources against the CRDs vendored
in tests/schemas/kuberay, core kinds with kubernetes-validate --strict, the PodMonitor structurally,
and jobs, images, Ray versions and GPU counts against the repository. The mutation tests at the end
prove that a broken manifest is reported with its file and field.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from typing import Any

import pytest
import yaml
from cli import run_srtrain, set_args
from k8s_checks import (
    DOCS,
    GPU,
    K8S,
    OVERLAYS,
    REPO,
    SCHEMAS,
    SECRET_TEXT,
    KustomizeError,
    Resource,
    all_resources,
    cluster_spec,
    commands,
    container_problems,
    containers,
    core_problems,
    crd_problems,
    credential_problems,
    dockerfile,
    dockerfile_arg,
    entrypoint_problems,
    gpu_limit,
    gpu_model_selectors,
    gpu_problems,
    gpu_visibility_problems,
    is_core,
    is_kuberay,
    is_prometheus,
    job_problems,
    job_references,
    kubectl,
    kubectl_words,
    kustomization_roots,
    kustomize,
    label,
    label_selector,
    lifecycle_problems,
    load_documents,
    locked_ray_version,
    manifest_commands,
    manifest_files,
    option,
    pod_templates,
    podmonitor_problems,
    production_problems,
    project_version,
    ray_pin,
    rel,
    rendered,
    rendered_root,
    run_kustomize,
    selects,
    shell_snippets,
    split_image,
    tune_available,
)

from srtrain.config import load_config

needs_tune = pytest.mark.skipif(
    not tune_available(), reason="the tune package (tune.search) is not importable yet"
)


# --- kustomize builds everything ----------------------------------------------------------------


def test_every_manifest_parses():
    for path in manifest_files():
        docs = load_documents(path)
        assert docs, f"{rel(path)}: no YAML documents"
        for i, doc in enumerate(docs):
            for key in ("apiVersion", "kind"):
                assert key in doc, f"{rel(path)}: document {i}: {key}: missing"


def test_the_layout_is_base_components_and_overlays():
    roots = kustomization_roots()
    assert roots == ["base", "overlays/cpu-dev", "overlays/gpu", "overlays/gpu-monitoring"], roots
    for name in ("identity", "monitoring"):
        (doc,) = load_documents(K8S / "components" / name / "kustomization.yaml")
        assert doc["kind"] == "Component", f"k8s/components/{name}: kind {doc['kind']}"


@pytest.mark.parametrize("root", kustomization_roots())
def test_kubectl_kustomize_builds(root):
    resources = rendered_root(root)
    kinds = sorted(r.obj["kind"] for r in resources)
    assert "RayJob" in kinds, f"k8s/{root}: renders no RayJob ({kinds})"
    namespaces = {r.obj["metadata"].get("namespace") for r in resources}
    if root == "base":
        assert namespaces == {None}, f"k8s/base sets a namespace: {namespaces}"
    else:
        assert len(namespaces) == 1 and None not in namespaces, f"{root}: namespaces {namespaces}"
    # the origin of every resource is a file of k8s/, so problems name the file to edit
    assert all(r.origin.startswith("k8s/") for r in resources), [r.origin for r in resources]


def test_overlays_differ_as_documented():
    def ids(overlay):
        return {f"{r.id[0]}/{r.id[2]}" for r in rendered(overlay)}

    gpu = ids("gpu")
    assert gpu == {
        "ServiceAccount/srtrain",
        "RayCluster/srtrain",
        "RayJob/srtrain-train",
        "RayJob/srtrain-tune",
    }
    assert ids("gpu-monitoring") == gpu | {"PodMonitor/srtrain-ray"}
    assert ids("cpu-dev") == {"ServiceAccount/srtrain", "RayJob/srtrain-train"}
    for r in rendered("cpu-dev"):
        for tpath, _, template in pod_templates(r):
            for cpath, c in containers(template):
                assert not gpu_limit(c), f"{label(r)}: {tpath}.{cpath}: a GPU in the CPU overlay"


def _overlay_with_patch(tmp_path, op: str) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "job.yaml").write_text((K8S / "base" / "rayjob-train.yaml").read_text())
    (tmp_path / "base" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [job.yaml]\n"
    )
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [base]\n"
        "patches:\n- target: {kind: RayJob, name: srtrain-train}\n"
        f"  patch: |-\n    - {op}\n"
    )


def test_a_patch_that_does_not_apply_is_reported_on_one_line(tmp_path):
    _overlay_with_patch(tmp_path, "{op: remove, path: /spec/entrypointt}")
    with pytest.raises(KustomizeError, match=r"^kubectl kustomize \S+: .*entrypointt") as e:
        kustomize(tmp_path)
    assert "\n" not in str(e.value)


def test_a_misspelled_replace_patch_is_caught_by_the_strict_crd_check(tmp_path):
    # kustomize's JSON 6902 `replace` adds a missing key instead of failing
    _overlay_with_patch(tmp_path, "{op: replace, path: /spec/entrypointt, value: x}")
    (job,) = kustomize(tmp_path)
    assert any("spec.entrypointt: unknown field" in p for p in crd_problems(job))


def test_resources_match_plain_kubectl_kustomize():
    """The origin annotations the checks add are the only difference from the real output."""
    plain = list(yaml.safe_load_all(run_kustomize(K8S / "overlays" / "gpu")))
    assert plain == [r.obj for r in rendered("gpu")]


# --- schemas ------------------------------------------------------------------------------------


def test_the_vendored_crds_say_where_they_come_from():
    readme = (SCHEMAS / "README.md").read_text()
    for needed in ("ray-project/kuberay", "feeaf72", "Apache", "ray-operator/config/crd/bases"):
        assert needed in readme, f"{rel(SCHEMAS / 'README.md')}: does not say {needed}"
    assert "Apache License" in (SCHEMAS / "LICENSE").read_text()


def test_kuberay_resources_match_the_crd_schemas():
    checked = [r for r in all_resources() if is_kuberay(r)]
    assert {r.obj["kind"] for r in checked} == {"RayCluster", "RayJob"}
    problems = [p for r in checked for p in crd_problems(r)]
    assert not problems, "\n".join(problems)


def test_core_resources_validate_strictly():
    checked = [r for r in all_resources() if is_core(r)]
    assert {"ServiceAccount", "Secret"} <= {r.obj["kind"] for r in checked}
    problems = [p for r in checked for p in core_problems(r)]
    assert not problems, "\n".join(problems)


def test_podmonitor_scrapes_the_ray_metrics_port_of_every_ray_pod():
    resources = list(rendered("gpu-monitoring"))
    (pm,) = [r for r in resources if is_prometheus(r)]
    assert pm.obj["kind"] == "PodMonitor"
    problems = podmonitor_problems(pm, resources)
    assert not problems, "\n".join(problems)


def test_podmonitor_check_reports_a_selector_or_port_that_misses():
    resources = list(rendered("gpu-monitoring"))
    (pm,) = [copy.deepcopy(r) for r in resources if is_prometheus(r)]
    pm.obj["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "train"
    assert any(
        "does not select" in p and "RayCluster/srtrain" in p
        for p in podmonitor_problems(pm, resources)
    )
    (pm,) = [copy.deepcopy(r) for r in resources if is_prometheus(r)]
    pm.obj["spec"]["podMetricsEndpoints"][0]["port"] = "metricz"
    assert any("'metricz'" in p for p in podmonitor_problems(pm, resources))
    (pm,) = [copy.deepcopy(r) for r in resources if is_prometheus(r)]
    pm.obj["apiVersion"] = "monitoring.coreos.com/v1alpha1"
    assert any("apiVersion/kind" in p for p in podmonitor_problems(pm, resources))


# --- what the deployment promises ---------------------------------------------------------------


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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retried_jobs_continue_the_same_run(overlay):
    jobs = [r for r in rendered(overlay) if r.obj["kind"] == "RayJob"]
    assert jobs
    problems = [p for r in jobs for p in entrypoint_problems(r)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_jobs_fail_fast_and_free_the_cluster_within_a_minute(overlay):
    problems = [p for r in rendered(overlay) for p in lifecycle_problems(r)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_head_and_submitter_cannot_see_gpus(overlay):
    problems = [p for r in rendered(overlay) for p in gpu_visibility_problems(r)]
    assert not problems, "\n".join(problems)


def test_gpu_workers_are_pinned_to_one_gpu_model():
    models, problems = gpu_model_selectors(list(rendered("gpu")))
    assert not problems, "\n".join(problems)
    assert len(models) == 1, f"GPU worker groups are pinned to different models: {models}"


def test_gpu_training_checkpoints_within_an_epoch():
    (job,) = [r for r in rendered("gpu") if r.id[2] == "srtrain-train"]
    problems, configs = job_problems(job, {"srtrain.run"})
    assert not problems and configs, problems
    for where, cfg in configs.items():
        every = cfg.train.checkpoint_every_steps
        assert 0 < every <= cfg.train.steps_per_epoch // 2, (
            f"{label(job)}: {where}: train.checkpoint_every_steps={every}: a lost node would "
            f"cost up to an epoch of {cfg.train.steps_per_epoch} steps"
        )


def test_long_lived_cluster_requires_a_token():
    (cluster,) = [r for r in rendered("gpu") if r.obj["kind"] == "RayCluster"]
    assert cluster.obj["spec"].get("authOptions", {}).get("mode") == "token", label(cluster)
    readme = (K8S / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in readme and "RAY_AUTH_TOKEN" in readme


def test_the_secret_template_redirects_s3_only():
    (secret,) = load_documents(K8S / "s3-credentials.example.yaml")
    assert "AWS_ENDPOINT_URL_S3" in secret["stringData"]
    assert "AWS_ENDPOINT_URL" not in secret["stringData"], "redirects STS too (IRSA breaks)"
    for path in [K8S / "README.md", K8S / "s3-credentials.example.yaml"]:
        assert not re.search(r"AWS_ENDPOINT_URL=", path.read_text()), rel(path)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"AWS_ENDPOINT_URL_S3": "http://s3only:1", "AWS_ENDPOINT_URL": "http://all:2"},
            "s3only:1",
        ),
        ({"AWS_ENDPOINT_URL": "http://all:2"}, "all:2"),
        ({"AWS_ENDPOINT_URL_S3": "http://s3only:1"}, "s3only:1"),
    ],
)
def test_storage_uses_the_endpoint_the_secret_sets(monkeypatch, env, expected):
    """Pods get AWS_ENDPOINT_URL_S3 from the Secret; it wins over AWS_ENDPOINT_URL, which still
    works alone, and a job's own data.endpoint_url wins over both."""
    from srtrain import storage

    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert storage.endpoint() == f"http://{expected}"
    # what pyarrow will connect to (its pickled arguments)
    assert storage.s3_filesystem().__reduce__()[1][0]["endpoint_override"] == expected
    assert storage.endpoint("http://job:3") == "http://job:3"


def test_the_gpu_image_is_an_immutable_reference():
    (kust,) = load_documents(K8S / "overlays" / "gpu" / "kustomization.yaml")
    (image,) = kust["images"]
    version = project_version()
    tag = str(image.get("newTag", ""))
    assert image.get("digest") or (tag.startswith(f"{version}-") and len(tag) > len(version) + 1), (
        f"k8s/overlays/gpu: images[srtrain]: {tag!r}: a tag reused by every build of {version}; "
        "use <version>-<commit> or a digest"
    )
    readme = (K8S / "README.md").read_text()
    assert "kustomize edit set image" in readme and "imagePullSecrets" in readme


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


# --- every manifest command the documentation quotes runs ---------------------------------------


def documented_commands() -> list[tuple[str, str]]:
    return [(doc, c) for doc in DOCS for c in manifest_commands((REPO / doc).read_text())]


def build_documented(command: str) -> tuple[list[dict], str, str | None]:
    """(the objects the command renders or applies, its verb, its label selector).

    `kubectl apply -k DIR` needs an API server even with --dry-run=client (it looks the kinds up),
    and there is none here, so apply, delete and diff -k are built as `kubectl kustomize DIR`, which
    is what they send. A pipeline from `kubectl kustomize` runs up to its final `kubectl`."""
    kubectl()  # skips where there is none
    words = kubectl_words(command)
    last = command.rfind("| kubectl")
    if words[0] == "kustomize" and last > 0:
        p = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command[:last]],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert p.returncode == 0, f"{command[:last]}: {p.stderr.strip()}"
        final = kubectl_words(command[last + 1 :])
        return list(yaml.safe_load_all(p.stdout)), final[0], option(final, "-l", "--selector")
    if words[0] == "kustomize":
        return list(yaml.safe_load_all(run_kustomize(REPO / words[1]))), "kustomize", None
    directory = option(words, "-k", "--kustomize")
    objs = list(yaml.safe_load_all(run_kustomize(REPO / directory)))
    return objs, words[0], option(words, "-l", "--selector")


POD_OWNERS = {"RayJob", "RayCluster"}


@pytest.mark.parametrize(("doc", "command"), documented_commands())
def test_documented_manifest_command_builds(doc, command):
    objs, verb, selector = build_documented(command)
    assert objs, f"{doc}: {command}: renders nothing"
    if selector:
        chosen = [o for o in objs if selects(label_selector(selector), o)]
        assert chosen, f"{doc}: {command}: -l {selector} selects nothing"
        kinds = {o["kind"] for o in chosen}
        if verb == "apply" and kinds & POD_OWNERS:
            # the pods' ServiceAccount must exist when the operator creates them
            assert "ServiceAccount" in kinds, f"{doc}: {command}: applies {kinds} without identity"
    elif verb == "apply":
        assert {"ServiceAccount"} <= {o["kind"] for o in objs}, f"{doc}: {command}"


def test_the_docs_quote_every_way_to_deploy():
    quoted = " ".join(c for _, c in documented_commands())
    for overlay in OVERLAYS:
        assert f"k8s/overlays/{overlay}" in quoted, f"no documented command uses {overlay}"
    assert "kubectl kustomize k8s/base" in quoted


def test_the_documented_base_unet_job_is_a_second_valid_run():
    (command,) = [c for _, c in documented_commands() if "srtrain-train-base" in c]
    objs, _, selector = build_documented(command)
    (job,) = [o for o in objs if o["kind"] == "RayJob" and o["metadata"]["name"].endswith("-base")]
    r = Resource(job, "k8s/README.md")
    assert selects(label_selector(selector), job)
    assert not entrypoint_problems(r) and not crd_problems(r)
    ((_, args),) = commands(job["spec"]["entrypoint"])
    assert args[args.index("--config") + 1].endswith("/iaprtc12-base.yaml")
    assert args[args.index("--name") + 1] == "iaprtc12-base"
    problems, configs = job_problems(r, {"srtrain.run"})
    assert not problems and [c.model.arch for c in configs.values()] == ["base"], problems


def test_irsa_annotation_comes_before_any_pod():
    """The role annotation is read when a pod is created: the README applies the ServiceAccount
    alone, annotates it, and only then applies jobs or the cluster."""
    lines = shell_snippets((K8S / "README.md").read_text())
    (annotate,) = [i for i, x in enumerate(lines) if "annotate serviceaccount" in x]
    kinds_at = {}
    for i, line in enumerate(lines):
        if re.search(r"kubectl\s+apply\s.*-k\s+k8s/overlays/gpu\b", line):
            objs, _, selector = build_documented(line)
            chosen = [o for o in objs if not selector or selects(label_selector(selector), o)]
            kinds_at[i] = {o["kind"] for o in chosen}
    before = [k for i, k in kinds_at.items() if i < annotate]
    assert before and all(k == {"ServiceAccount"} for k in before), before
    assert any(k & POD_OWNERS for i, k in kinds_at.items() if i > annotate)


def test_label_selector_parsing():
    sel = label_selector("app.kubernetes.io/component in (identity,train),app.kubernetes.io/name=x")
    assert sel == [
        ("app.kubernetes.io/component", {"identity", "train"}),
        ("app.kubernetes.io/name", {"x"}),
    ]
    obj = {
        "metadata": {
            "labels": {"app.kubernetes.io/component": "train", "app.kubernetes.io/name": "x"}
        }
    }
    assert selects(sel, obj)
    assert not selects(label_selector("app.kubernetes.io/component=tune"), obj)
    with pytest.raises(ValueError):
        label_selector("a notin (b)")


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


def test_a_misspelled_field_is_reported_with_file_and_path():
    r = _gpu_train_job()
    worker = _at(r.obj, WORKER)
    worker["resurces"] = worker.pop("resources")
    problems = crd_problems(r)
    assert any(
        "k8s/base/rayjob-train.yaml" in p and f"{WORKER_PATH}.resurces: unknown field" in p
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
        "k8s/base/rayjob-train.yaml" in p
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
        "k8s/base/rayjob-train.yaml" in p
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
            f"{WORKER_PATH}.{field}" in p and "k8s/base/rayjob-train.yaml" in p for p in problems
        ), (field, problems)
    secret = Resource(load_documents(K8S / "s3-credentials.example.yaml")[0], "k8s/x.yaml")
    secret.obj["stringData"]["AWS_SECRET_ACCESS_KEY"] = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert any("stringData.AWS_SECRET_ACCESS_KEY" in p for p in credential_problems(secret))
    assert any(
        rx.search("AWS_SECRET_ACCESS_KEY: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        for rx in SECRET_TEXT
    )


@pytest.mark.slow
def test_the_train_entrypoint_run_twice_starts_then_continues(tmp_path):
    """The rendered entrypoint's own flags (--name, --resume, --set ...) on the bundled samples,
    locally: the first attempt finds nothing and starts, the second continues the same run."""
    (job,) = [r for r in rendered("gpu") if r.id[2] == "srtrain-train"]
    ((module, args),) = commands(job.obj["spec"]["entrypoint"])
    assert module == "srtrain.run"
    i = args.index("--config")
    args = args[:i] + args[i + 2 :]  # the samples job instead of the one on S3
    tiny = set_args(
        "data.patch_size=32",
        "data.val_patch_size=64",
        "data.batch_size=4",
        "model.filters=16",
        "train.epochs=1",
        "train.steps_per_epoch=4",
        "train.val_steps=1",
        "train.precision=fp32",
        "train.sample_images=1",
    )
    command = ["--local", *args, *tiny, "--output", str(tmp_path)]
    (name,) = [args[j + 1] for j, a in enumerate(args) if a == "--name"]
    first = run_srtrain(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"no run {name!r}" in first.stdout and "starting it" in first.stdout
    second = run_srtrain(*command)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout, second.stdout[-2000:]
    rows = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1], "the second attempt trained again"


@pytest.mark.slow
@pytest.mark.ray
def test_the_tune_entrypoint_starts_a_search_that_does_not_exist_yet(tmp_path):
    (job,) = [r for r in rendered("gpu") if r.id[2] == "srtrain-tune"]
    ((module, args),) = commands(job.obj["spec"]["entrypoint"])
    assert module == "tune.search" and "--resume" in args
    tiny = {
        "data": {"source": "samples", "patch_size": 32, "val_patch_size": 64, "batch_size": 4},
        "model": {"arch": "base", "filters": 8},
        "train": {"epochs": 1, "steps_per_epoch": 2, "precision": "fp32", "sample_images": 1},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "search": {
            "num_samples": 1,
            "max_concurrent_trials": 1,
            "space": {"train.lr": {"loguniform": [1.0e-4, 1.0e-2]}},
        },
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(tiny))
    i = args.index("--config")
    args = [*args[:i], "--config", str(tmp_path / "tiny.yaml"), *args[i + 2 :]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    p = subprocess.run(
        [sys.executable, "-m", "tune.search", *args, "--output", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-2000:]
