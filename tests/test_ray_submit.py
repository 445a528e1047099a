"""`ray job submit` end to end: a Ray head on 127.0.0.1 (its own free ports, temp dir and process
group), jobs/smoke.yaml submitted with jobs/runtime_env.yaml as a user would from the repository
root, SUCCEEDED, and the run's result.json. Only the head this test starts is stopped (never
`ray stop`, which would stop every Ray on the machine, other tests' included)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import closing, suppress
from pathlib import Path

import pytest
from seaweed import free_ports

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SMOKE = REPO / "jobs" / "smoke.yaml"


def free_port_range(size: int, avoid: set[int]) -> int:
    """The first port of `size` consecutive free ports (for Ray's worker port range)."""
    rng = int.from_bytes(os.urandom(2), "big")
    for attempt in range(50):
        first = 20000 + (rng + attempt * 977) % 30000
        ports = range(first, first + size)
        if avoid.intersection(ports):
            continue
        try:
            held = []
            for p in ports:
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"no {size} consecutive free ports found")


def clean_env() -> dict[str, str]:
    """This environment without any Ray address, with this venv's `python` first on PATH (the
    job's entrypoint `python -m srtrain.run` runs under the head's environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Explicit, so head and CLI agree: left unset, `ray start` turns token authentication on when
    # ~/.ray/auth_token exists (a local ray.init() writes one) but `ray job submit` does not. The
    # head listens on loopback only and lives for this test.
    env["RAY_AUTH_MODE"] = "disabled"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def wait_for_dashboard(url: str, head: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with closing(urllib.request.urlopen(f"{url}/api/version", timeout=2)):
                return
        except urllib.error.HTTPError:  # it answers (routes may still be registering)
            return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(
        f"the dashboard at {url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
    )


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group (raylet, GCS, dashboard, workers), then SIGKILL."""
    if head.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    # Ray's children stay in the group after `ray start` itself exits; take down stragglers.
    with suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        head.wait(timeout=10)


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 with the dashboard; yields the dashboard URL."""
    # Unix socket paths must stay under ~107 characters: a short temp dir, not pytest's tmp_path.
    temp_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    names = (
        "port",
        "dashboard-port",
        "ray-client-server-port",
        "node-manager-port",
        "object-manager-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
        "metrics-export-port",
    )
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    first_worker = free_port_range(100, set(ports.values()))
    cmd = [
        RAY,
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--num-cpus",
        "2",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(200 * 1024 * 1024),
        "--temp-dir",
        str(temp_dir),
        "--disable-usage-stats",
        "--min-worker-port",
        str(first_worker),
        "--max-worker-port",
        str(first_worker + 99),
    ]
    for name, port in ports.items():
        cmd += [f"--{name}", str(port)]
    # Every Ray process of this head inherits its environment. Train V2's placement-group cleaner
    # finds "its" cluster through RAY_ADDRESS, else /tmp/ray/ray_current_cluster or a scan for
    # gcs_server processes, which on a machine running other Ray instances picks the wrong one
    # (or none) and may remove the run's placement group: pin it to this head.
    env = {**clean_env(), "RAY_ADDRESS": f"127.0.0.1:{ports['port']}"}
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{ports['dashboard-port']}"
        wait_for_dashboard(url, head, log)
        yield url
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ray_job_submit_runs_the_smoke_job_to_succeeded(ray_head, tmp_path):
    submission_id = f"smoke-{uuid.uuid4().hex[:8]}"
    runs = tmp_path / "runs"
    submit = subprocess.run(
        [
            RAY,
            "job",
            "submit",
            "--address",
            ray_head,
            "--submission-id",
            submission_id,
            "--runtime-env",
            "jobs/runtime_env.yaml",
            "--",
            "python",
            "-m",
            "srtrain.run",
            "--config",
            "jobs/smoke.yaml",
            "--output",
            str(runs),
            "--name",
            "smoke",
        ],
        check=False,
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    assert f"Job '{submission_id}' succeeded" in out, out[-4000:]
    # the entrypoint's own last line reached the submitter
    assert "done: " in out and "val_psnr" in out

    with closing(urllib.request.urlopen(f"{ray_head}/api/jobs/{submission_id}", timeout=30)) as r:
        job = json.load(r)
    assert job["status"] == "SUCCEEDED", job

    result = json.loads((runs / "smoke" / "result.json").read_text())
    import yaml

    planned = yaml.safe_load(SMOKE.read_text())["train"]
    assert result["steps"] == planned["epochs"] * planned["steps_per_epoch"]
    assert result["epochs"] == planned["epochs"]
    assert 5 < result["bicubic_psnr"] < 40
    assert result["val_psnr"] is not None and result["val_psnr"] > 0
    assert result["checkpoint"] and str(runs / "smoke") in result["checkpoint"]
    rows = (runs / "smoke" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == planned["epochs"]
