"""Where training runs: the tf.distribute strategy, logical CPU replicas, the dtype policy, and
sums over workers.

`pick_strategy` chooses from what the process sees (TF_CONFIG, GPUs, logical CPUs), so the same
loop (srtrain.train) runs on one device, several GPUs of one node, or several Ray Train workers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import tensorflow as tf


def split_cpu(replicas: int) -> None:
    """Makes the CPU appear as `replicas` logical devices (debug.cpu_replicas); must run before
    TensorFlow initialises its runtime."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) != replicas:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(replicas)]
        )


def pick_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG lists more than one worker, Mirrored when this process
    sees several GPUs (or several logical CPU devices, debug.cpu_replicas), else the default."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    workers = tf_config.get("cluster", {}).get("worker", [])
    if len(workers) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in gpus])
    cpus = tf.config.list_logical_devices("CPU")
    if not gpus and len(cpus) > 1:
        return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.get_strategy()


def cpu_kernels() -> str:
    """The library TensorFlow's CPU ops run on in this process: "oneDNN" (TF_ENABLE_ONEDNN_OPTS,
    which srtrain turns on unless the user set it) or "Eigen"; "kernels unknown" where
    TensorFlow no longer has the private module it asks (checked with the pinned 2.21)."""
    try:
        from tensorflow.python.util import _pywrap_util_port

        enabled = _pywrap_util_port.IsMklEnabled()
    except (ImportError, AttributeError):
        return "kernels unknown"
    return "oneDNN" if enabled else "Eigen"


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def dtype_policy(precision: str) -> str:
    """Keras dtype policy name for train.precision; "auto" picks bf16 where hardware has it."""
    if precision == "auto":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            major = (details.get("compute_capability") or (0, 0))[0]
            precision = "bf16" if major >= 8 else "fp16"
        else:
            precision = "bf16" if _cpu_has_fast_bf16() else "fp32"
    return {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}[precision]


def sum_over_workers(strategy, values: np.ndarray) -> np.ndarray:
    """Sums a vector over workers (every worker must call this the same number of times)."""
    if strategy.extended._in_multi_worker_mode():
        local_replicas = len(strategy.extended.worker_devices)
        local = tf.constant(values / local_replicas, tf.float64)
        per_replica = strategy.run(lambda: tf.identity(local))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None).numpy()
    return values
