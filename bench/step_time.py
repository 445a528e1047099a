"""Seconds per training step of one U-Net alone (no input pipeline), for sizing time-limited jobs.

    python bench/step_time.py              # Base, 64 filters, batch 16, HR patches 128 and 96
    python bench/step_time.py --arch advanced --patches 128

Random tensors, Adam, MAE, one `tf.function` step; 2 warm-up steps, then `--steps` timed ones.
Each patch size's figure stands beside the first one's (the ratio), measured in the same run.
Writes bench/results/step_time.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import keras
import tensorflow as tf

from srtrain import models
from srtrain.config import ARCH_FLAGS


def step_seconds(arch: str, filters: int, patch: int, batch: int, steps: int) -> float:
    flags = dict.fromkeys(ARCH_FLAGS, arch == "advanced")
    model = models.build_unet(filters=filters, **flags)
    opt = keras.optimizers.Adam(1e-3)
    lr = tf.random.uniform((batch, patch // 2, patch // 2, 3))
    hr = tf.random.uniform((batch, patch, patch, 3))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.abs(model(lr, training=True) - hr))
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    for _ in range(2):
        step().numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["base", "advanced"], default="base")
    p.add_argument("--filters", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patches", default="128,96", help="HR patch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_time.json"))
    a = p.parse_args()
    rows = []
    for patch in (int(x) for x in a.patches.split(",")):
        s = step_seconds(a.arch, a.filters, patch, a.batch, a.steps)
        rows.append({"patch": patch, "seconds_per_step": s, "images_per_sec": a.batch / s})
        rows[-1]["vs_first"] = rows[0]["seconds_per_step"] / s
        print(f"{a.arch} {a.filters} filters, patch {patch} x batch {a.batch}: {s:.3f} s/step, "
              f"{a.batch / s:.1f} images/s ({rows[-1]['vs_first']:.2f}x patch {rows[0]['patch']})",
              flush=True)  # fmt: skip
    out = {"cpu": platform.processor() or platform.machine(), "args": vars(a), "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
