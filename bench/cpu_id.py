"""Which CPU a benchmark ran on, for its results file. No TensorFlow here: feed.py's
`--iapr-scale` keeps it out of its main process."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_id() -> tuple[str, set[str]]:
    """The first CPU's model name with its family and model numbers, and its flags. VMs name
    CPUs that differ here by 2x alike ("AMD EPYC": family 23 is Zen 1 or 2, 25 Zen 3 or 4, 26
    Zen 5; AVX2 only or AVX-512 with bf16). Where /proc is unreadable: platform's name, no
    flags."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first CPU's block is enough
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name, set(info.get("flags", "").split())
