"""Runs `python -m srtrain.run` in a subprocess, as a user would, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def set_args(*overrides: str) -> list[str]:
    """`--set KEY=VALUE` for each override, as srtrain.run and tune.search take them."""
    return [arg for override in overrides for arg in ("--set", override)]


def run_srtrain(
    *args: str, env: dict | None = None, cwd: Path = REPO, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`python -m srtrain.run ARGS` with this environment plus `env`, never joining a Ray
    cluster from RAY_ADDRESS (a test starts what it needs); output captured as text."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "srtrain.run", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_mode(test_file: str, mode: str, timeout: float = 600) -> dict:
    """Runs `python TEST_FILE MODE` (a test module's own `__main__`, for what must start in a
    fresh process, e.g. logical CPU devices) and returns the JSON object on its last line."""
    p = subprocess.run(
        [sys.executable, test_file, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])
