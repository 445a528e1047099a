"""srtrain/devices.py: which CPU kernels TensorFlow runs on once srtrain is imported.

TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads, so each case is a fresh process.
On a CPU without AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (AVX2-only), TensorFlow's own default
is Eigen, and only srtrain's default makes the first case pass.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = "import srtrain.devices as d; print(d.cpu_kernels())"


@pytest.mark.parametrize(
    "env, kernels",
    [({}, "oneDNN"), ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "Eigen")],
    ids=["srtrain-default", "user-turned-off"],
)
def test_onednn_kernels_are_on_unless_the_user_turned_them_off(env, kernels):
    full = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"} | env
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=full, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split()[-1] == kernels


def test_kernels_are_unknown_when_tensorflow_lacks_the_private_probe(monkeypatch):
    from tensorflow.python import util

    import srtrain.devices as d

    # As in a TensorFlow without the module: not an attribute of its package, and a None entry
    # in sys.modules makes importing it fail.
    monkeypatch.delattr(util, "_pywrap_util_port")
    monkeypatch.setitem(sys.modules, "tensorflow.python.util._pywrap_util_port", None)
    assert d.cpu_kernels() == "kernels unknown"
