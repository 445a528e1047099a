"""Seconds per training step of one U-Net alone (no input pipeline), for sizing time-limited jobs.

    python bench/step_time.py              # Base, 64 filters, batch 16, HR patches 128 and 96
    python bench/step_time.py --arch advanced --patches 128
    python bench/step_time.py --onednn --batch 8 --patches 128   # bench/results/onednn.json
    python bench/step_time.py --graph --batch 8 --patches 128    # bench/results/step_graph.json
    python bench/step_time.py --fused-bn --patches 128          # bench/results/step_fused_bn.json

Random tensors, Adam, MAE, fp32, one `tf.function` step; 2 warm-up steps, then `--steps` timed
ones. Each patch size's figure stands beside the first one's (the ratio), measured in the same
run. Writes bench/results/step_time.json.

--onednn: the same step for Base and Advanced under TensorFlow's two CPU kernel libraries, each
variant a fresh process (the choice is read once, when TensorFlow loads), all variants in turn
per repeat, medians over `--repeats`, each beside `eigen`'s (the ratio):
  eigen        TF_ENABLE_ONEDNN_OPTS=0: TensorFlow's own (Eigen) kernels, its default on Linux
               CPUs without AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX (AVX2-only CPUs)
  onednn-avx2  TF_ENABLE_ONEDNN_OPTS=1 with ONEDNN_MAX_CPU_ISA=AVX2: oneDNN held to AVX2, what an
               AVX2-only CPU runs when srtrain turns oneDNN on there
  onednn       TF_ENABLE_ONEDNN_OPTS=1: oneDNN with everything this CPU has

--graph: the step of the model as srtrain builds it against the same model as it was built
before two changes that keep its function and weights (srtrain/models.py): the final 1x1 conv
now runs before the bilinear x2 upsample (3 channels upsampled instead of 64, at LR size), and
the decoder's upsamples compute in float32 (under a mixed policy Keras clipped their float32
result to the 16-bit range before the cast). fp32 and bf16, Base and Advanced, both graphs
alternated in one process, medians over `--repeats`, each beside `before` (the ratio).

--fused-bn: the Advanced U-Net's step with Keras 3's BatchNormalization (separate reduction
and elementwise ops; 16-bit inputs cast to float32 first), as srtrain trained it before, against
the same model, same weights, as srtrain builds it for training now: its BatchNorm layers
compute the training-mode normalisation with TensorFlow's fused kernel
(`srtrain.models.FusedBatchNormalization`, on the layer's own input dtype). First checks that
both give the same training-mode outputs and moving statistics from
one forward pass, then times both alternated, fp32 and bf16, medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import tensorflow as tf
from cpu_id import cpu_id
from keras import layers

from srtrain import models
from srtrain.config import ARCH_FLAGS

VARIANTS = {
    "eigen": {"TF_ENABLE_ONEDNN_OPTS": "0"},
    "onednn-avx2": {"TF_ENABLE_ONEDNN_OPTS": "1", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "onednn": {"TF_ENABLE_ONEDNN_OPTS": "1"},
}


def step_seconds(arch: str, filters: int, patch: int, batch: int, steps: int) -> float:
    flags = dict.fromkeys(ARCH_FLAGS, arch == "advanced")
    step = train_step(models.build_unet(filters=filters, **flags), patch, batch)
    for _ in range(2):
        step().numpy()
    t0 = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return (time.perf_counter() - t0) / steps


def train_step(model: keras.Model, patch: int, batch: int):
    """One compiled Adam step on MAE, random tensors (the function returns the loss)."""
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

    return step


def as_before(model: keras.Model, policy: str) -> keras.Model:
    """`model` rebuilt as srtrain built it before: its decoder upsamples under `policy`, and the
    head upsample -> 1x1 conv + sigmoid (F channels upsampled); the same weights."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, layers.UpSampling2D):
            config["dtype"] = policy
        return type(layer).from_config(config)

    body = keras.models.clone_model(model, clone_function=clone)
    x = layers.UpSampling2D(2, interpolation="bilinear", dtype=policy)(body.get_layer("out").input)
    out = layers.Conv2D(3, 1, activation="sigmoid", dtype="float32")(x)
    before = keras.Model(body.input, out)
    before.set_weights(model.get_weights())
    return before


def alternated(models_: dict[str, keras.Model], patch: int, a: argparse.Namespace) -> dict:
    """The train steps of `models_` timed in turn, `a.repeats` times `a.steps` steps after 2
    warm-up steps each: medians, each beside the first model's (`vs_<its name>`)."""
    steps = {name: train_step(m, patch, a.batch) for name, m in models_.items()}
    runs: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():
        for _ in range(2):
            step().numpy()
    for _ in range(a.repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step().numpy()
            runs[name].append((time.perf_counter() - t0) / a.steps)
    first = next(iter(runs))
    ref = statistics.median(runs[first])
    out = {}
    for name, got in runs.items():
        sec = statistics.median(got)
        out[name] = {
            "seconds_per_step": round(sec, 4),
            "images_per_sec": round(a.batch / sec, 2),
            f"vs_{first}": round(ref / sec, 3),
            "runs": [round(x, 4) for x in got],
        }
    return out


def compare_graphs(a: argparse.Namespace) -> dict:
    """Steps per second of `before` and `now` for each arch and precision, alternated."""
    patch = int(a.patches.split(",")[0])
    rows = {}
    for arch in ("base", "advanced"):
        for precision, policy in (("fp32", "float32"), ("bf16", "mixed_bfloat16")):
            flags = dict.fromkeys(ARCH_FLAGS, arch == "advanced")
            now = models.build_unet(filters=a.filters, dtype=policy, **flags)
            before = as_before(now, policy)
            probe = tf.random.uniform((2, patch // 2, patch // 2, 3))
            differ = float(tf.reduce_max(tf.abs(now(probe) - before(probe))))
            row = {"max_output_difference": differ}
            row |= alternated({"before": before, "now": now}, patch, a)
            rows[f"{arch} {precision}"] = row
            print(f"{arch} {precision}: before {row['before']['images_per_sec']} img/s, now "
                  f"{row['now']['images_per_sec']} ({row['now']['vs_before']}x); outputs differ "
                  f"by at most {differ:.1e}", flush=True)  # fmt: skip
    return rows


def compare_fused_bn(a: argparse.Namespace) -> dict:
    """The Advanced step with Keras' BatchNorm and with srtrain's fused one, alternated."""
    patch = int(a.patches.split(",")[0])
    rows = {}
    for precision, policy in (("fp32", "float32"), ("bf16", "mixed_bfloat16")):
        flags = dict.fromkeys(ARCH_FLAGS, True)
        keras_bn = models.build_unet(filters=a.filters, dtype=policy, **flags)
        fused = models.build_unet(filters=a.filters, dtype=policy, fused_batch_norm=True, **flags)
        fused.set_weights(keras_bn.get_weights())
        probe = tf.random.uniform((a.batch, patch // 2, patch // 2, 3), seed=1)
        outputs = keras_bn(probe, training=True), fused(probe, training=True)
        differ = float(tf.reduce_max(tf.abs(outputs[0] - outputs[1])))
        pairs = zip(keras_bn.non_trainable_weights, fused.non_trainable_weights, strict=True)
        moving = max(float(tf.reduce_max(tf.abs(x - y))) for x, y in pairs)
        row = {"max_training_output_difference": differ, "max_moving_statistics_difference": moving}
        row |= alternated({"keras": keras_bn, "fused": fused}, patch, a)
        rows[f"advanced {precision}"] = row
        print(f"advanced {precision}: keras {row['keras']['images_per_sec']} img/s, fused "
              f"{row['fused']['images_per_sec']} ({row['fused']['vs_keras']}x); training outputs "
              f"differ by at most {differ:.1e}, moving statistics by {moving:.1e}",
              flush=True)  # fmt: skip
    return rows


def onednn_enabled() -> bool:
    from tensorflow.python.util import _pywrap_util_port

    return bool(_pywrap_util_port.IsMklEnabled())


def cpu() -> dict:
    model, flags = cpu_id()
    isa = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_bf16")
    cores = len(os.sched_getaffinity(0))
    return {"model": model, "cores": cores, "flags": [f for f in isa if f in flags]}


def compare_onednn(a: argparse.Namespace) -> dict:
    """Each arch under each of VARIANTS, a fresh process apiece, variants in turn per repeat."""
    patch = a.patches.split(",")[0]
    seconds = {arch: {v: [] for v in VARIANTS} for arch in a.archs}
    onednn: dict[str, bool] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        for r in range(a.repeats):
            for arch in a.archs:
                for name, extra in VARIANTS.items():
                    cmd = [sys.executable, __file__, "--arch", arch, "--filters", str(a.filters),
                           "--batch", str(a.batch), "--patches", patch, "--steps", str(a.steps),
                           "--out", str(out)]  # fmt: skip
                    env = {**os.environ, **extra}
                    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
                    got = json.loads(out.read_text())
                    seconds[arch][name].append(got["rows"][0]["seconds_per_step"])
                    onednn[name] = got["onednn"]
                    took = f"{seconds[arch][name][-1]:.3f} s/step"
                    print(f"repeat {r + 1}/{a.repeats} {arch} {name}: {took}", flush=True)
    rows = {}
    for arch, by_variant in seconds.items():
        ref = statistics.median(by_variant["eigen"])
        rows[arch] = {}
        for name, runs in by_variant.items():
            s = statistics.median(runs)
            rows[arch][name] = {
                "seconds_per_step": round(s, 4),
                "images_per_sec": round(a.batch / s, 2),
                "vs_eigen": round(ref / s, 3),
                "runs": [round(x, 4) for x in runs],
            }
    return {"variants": {k: {"env": v, "onednn_enabled": onednn[k]} for k, v in VARIANTS.items()},
            "archs": rows}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["base", "advanced"], default="base")
    p.add_argument("--filters", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patches", default="128,96", help="HR patch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--onednn", action="store_true", help="compare TensorFlow's CPU kernels")
    p.add_argument("--graph", action="store_true", help="compare the model's graph with before")
    p.add_argument(
        "--fused-bn", action="store_true", help="Advanced: Keras' BatchNorm vs the fused one"
    )
    p.add_argument("--repeats", type=int, default=3, help="with --onednn, --graph and --fused-bn")
    p.add_argument("--out", help="default bench/results/step_time.json (onednn.json with --onednn)")
    a = p.parse_args()
    results = Path(__file__).parent / "results"
    if a.onednn:
        a.archs = ["base", "advanced"]
        out = {"cpu": cpu(), "tensorflow": tf.__version__, "batch": a.batch,
               "patch": int(a.patches.split(",")[0]), "steps": a.steps, "repeats": a.repeats,
               **compare_onednn(a)}  # fmt: skip
        for arch, by in out["archs"].items():
            got = (f"{k} {v['images_per_sec']} img/s ({v['vs_eigen']}x)" for k, v in by.items())
            print(f"{arch}: " + ", ".join(got))
        path = Path(a.out or results / "onednn.json")
    elif a.graph or a.fused_bn:
        compare, name = (
            (compare_graphs, "step_graph") if a.graph else (compare_fused_bn, "step_fused_bn")
        )
        out = {"cpu": cpu(), "onednn": onednn_enabled(), "tensorflow": tf.__version__,
               "keras": keras.__version__, "batch": a.batch, "patch": int(a.patches.split(",")[0]),
               "steps": a.steps, "repeats": a.repeats, "rows": compare(a)}  # fmt: skip
        path = Path(a.out or results / f"{name}.json")
    else:
        rows = []
        for patch in (int(x) for x in a.patches.split(",")):
            s = step_seconds(a.arch, a.filters, patch, a.batch, a.steps)
            rows.append({"patch": patch, "seconds_per_step": s, "images_per_sec": a.batch / s})
            rows[-1]["vs_first"] = rows[0]["seconds_per_step"] / s
            vs = f"{rows[-1]['vs_first']:.2f}x patch {rows[0]['patch']}"
            print(f"{a.arch} {a.filters} filters, patch {patch} x batch {a.batch}: {s:.3f} s/step, "
                  f"{a.batch / s:.1f} images/s ({vs})", flush=True)  # fmt: skip
        out = {"cpu": cpu()["model"], "onednn": onednn_enabled(), "args": vars(a), "rows": rows}
        path = Path(a.out or results / "step_time.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
