"""Input-pipeline benchmark: images/s the training pipeline delivers (not a test).

    python bench/pipeline.py [--repeats 3] [--batches 100] [--patch 256] [--out FILE]

Over BSD200 re-encoded as JPEG quality 95 (it stands in for IAPR TC-12), in one run:
  (a)  ours, local shards:  srtrain.data.train_dataset reading Parquet shards from a local directory
  (a2) the same with data.patches_per_image=2 (one decode, two patches in two batches)
  (b)  ours, S3 shards:     (a) reading the same shards from SeaweedFS S3 on loopback, streaming
  (b2) the same with data.patches_per_image=2
  (bc) (b) with data.cache=true: the first pass streams from S3, later ones read the local copy
  (c)  reference:           the original notebook's way: file list -> tf.data map -> decode_jpeg ->
                            random crop/flip/rot90 -> py_function (OpenCV area resize, 5x5 Gaussian
                            blur, numpy noise) -> batch 8 -> prefetch
Each repeat times every pipeline in turn (so machine noise hits all three alike); the figures are
medians over repeats. "Per core" divides images/s by the cores this process may use; "per CPU
second" divides images by the CPU time actually consumed (this process, plus the S3 server for
(b)), which is steadier on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np
import tensorflow as tf
from PIL import Image

from srtrain import data
from srtrain.config import load_config
from srtrain.data import builder

REPO = Path(__file__).resolve().parents[1]
BSD200 = REPO.parent / "shared" / "datasets" / "bsd200"
sys.path.insert(0, str(REPO / "tests"))


def make_jpegs(src: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p in sorted(src.glob("*.png")):
        dst = out / f"{p.stem}.jpg"
        if not dst.exists():
            Image.open(p).convert("RGB").save(dst, quality=95)
        files.append(dst)
    return files


def reference_pipeline(files: list[Path], size: int, batch: int) -> tf.data.Dataset:
    """The original notebook's input pipeline, re-implemented as it was written."""

    def degrade_np(hr: np.ndarray) -> np.ndarray:
        lr = cv2.resize(hr, (size // 2, size // 2), interpolation=cv2.INTER_AREA)
        lr = cv2.GaussianBlur(lr, (5, 5), 1.0)
        lr = lr + np.random.normal(0, 10 / 255.0, lr.shape).astype(np.float32)
        return np.clip(lr, 0, 1).astype(np.float32)

    def load(path):
        img = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        img = tf.image.random_crop(img, [size, size, 3])
        img = tf.image.random_flip_left_right(img)
        img = tf.image.rot90(img, tf.random.uniform([], 0, 4, tf.int32))
        return tf.image.convert_image_dtype(img, tf.float32)

    def pair(hr):
        lr = tf.py_function(lambda h: degrade_np(h.numpy()), [hr], tf.float32)
        lr.set_shape([size // 2, size // 2, 3])
        return lr, hr

    ds = tf.data.Dataset.from_tensor_slices([str(f) for f in files]).shuffle(len(files)).repeat()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(pair, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE)


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (default: this one, all threads)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(make, batches: int, batch: int, warmup: int, server_pid: int | None = None) -> dict:
    it = iter(make())
    for _ in range(warmup):
        next(it)
    t0, c0 = time.perf_counter(), cpu_seconds()
    s0 = cpu_seconds(server_pid) if server_pid else 0.0
    for _ in range(batches):
        lr, hr = next(it)
    _ = float(tf.reduce_sum(lr)) + float(tf.reduce_sum(hr))
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - c0
    server = (cpu_seconds(server_pid) - s0) if server_pid else 0.0
    images = batches * batch
    del it
    return {
        "images_per_s": images / wall,
        "images_per_cpu_s": images / (cpu + server),
        "images_per_client_cpu_s": images / cpu,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", type=int, default=100, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "pipeline.json"))
    p.add_argument("--no-s3", action="store_true", help="skip (b) (no SeaweedFS)")
    args = p.parse_args(argv)
    if not BSD200.is_dir():
        print(f"error: {BSD200} not found (the shared datasets)", file=sys.stderr)
        return 1
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="srtrain-bench-"))
    files = make_jpegs(BSD200, work / "bsd200-jpeg95")
    local = work / "shards"
    split = {"train": 1.0}
    builder.build(
        str(work / "bsd200-jpeg95"), str(local), split=split, shard_size=2 * 2**20, progress=False
    )
    base = [f"data.patch_size={args.patch}", f"data.batch_size={args.batch}"]

    def ours(source: str, *extra: str):
        cfg = load_config(None, [*base, f"data.source={source}", *extra])
        return lambda: data.train_dataset(cfg)

    pipelines = {
        "c_reference": (lambda: reference_pipeline(files, args.patch, args.batch), None),
        "a_ours_local": (ours(str(local)), None),
        "a2_ours_local_2_per_image": (ours(str(local), "data.patches_per_image=2"), None),
    }
    server = None
    if not args.no_s3:
        from seaweed import SeaweedS3

        server = SeaweedS3(bucket="bench").start()
        os.environ.update(server.env)
        os.environ["SRTRAIN_CACHE"] = str(work / "cache")
        s3_uri = "s3://bench/bsd200-jpeg95"
        builder.build(
            str(work / "bsd200-jpeg95"), s3_uri, split=split, shard_size=2 * 2**20, progress=False
        )
        pid = server.proc.pid
        pipelines["b_ours_s3"] = (ours(s3_uri), pid)
        pipelines["b2_ours_s3_2_per_image"] = (ours(s3_uri, "data.patches_per_image=2"), pid)
        pipelines["bc_ours_s3_cached"] = (ours(s3_uri, "data.cache=true"), pid)
    runs: dict[str, list[dict]] = {k: [] for k in pipelines}
    load_before = os.getloadavg()
    try:
        for r in range(args.repeats):
            for name, (make, pid) in pipelines.items():
                m = measure(make, args.batches, args.batch, args.warmup, pid)
                runs[name].append(m)
                print(
                    f"repeat {r + 1}/{args.repeats} {name:<26} {m['images_per_s']:7.0f} img/s "
                    f"{m['images_per_cpu_s']:7.0f} img/CPU-s",
                    flush=True,
                )
    finally:
        if server:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    results = {}
    for name, ms in runs.items():
        ips = statistics.median(m["images_per_s"] for m in ms)
        results[name] = {
            "images_per_s": round(ips, 1),
            "images_per_s_per_core": round(ips / cores, 1),
            "images_per_cpu_s": round(statistics.median(m["images_per_cpu_s"] for m in ms), 1),
            "images_per_client_cpu_s": round(
                statistics.median(m["images_per_client_cpu_s"] for m in ms), 1
            ),
            "repeats": [{k: round(v, 1) for k, v in m.items()} for m in ms],
        }
    pairs = {
        "a_over_c": ("a_ours_local", "c_reference"),
        "a2_over_c": ("a2_ours_local_2_per_image", "c_reference"),
        "b_over_a": ("b_ours_s3", "a_ours_local"),
        "b2_over_a2": ("b2_ours_s3_2_per_image", "a2_ours_local_2_per_image"),
        "bc_over_a": ("bc_ours_s3_cached", "a_ours_local"),
    }
    ratios = {}
    for key in ("images_per_s_per_core", "images_per_cpu_s", "images_per_client_cpu_s"):
        for name, (x, y) in pairs.items():
            if x in results and y in results:
                ratios[f"{name}_{key}"] = round(results[x][key] / results[y][key], 2)
    out = {
        "what": "training input pipeline throughput, BSD200 as JPEG q95 (200 photos, 481x321)",
        "patch": args.patch,
        "batch": args.batch,
        "batches_timed": args.batches,
        "repeats": args.repeats,
        "cores": cores,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__,
        "results": results,
        "ratios": ratios,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(
        json.dumps(
            {
                "ratios": ratios,
                **{k: {x: v[x] for x in v if x != "repeats"} for k, v in results.items()},
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
