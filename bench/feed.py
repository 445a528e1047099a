"""What one GPU needs from the CPU: training pairs/s per CPU core of the input pipeline alone.

    python bench/feed.py [--quick] [--repeats 5] [--batches 40] [--out FILE]
    python bench/feed.py --iapr-scale [--images 20000] [--work DIR] [--out FILE]

Default mode (bench/results/feed.json). BSD200 re-encoded as JPEG (quality 95, as
bench/pipeline.py does) in a temporary directory, built into local shards, then in one run,
batch 64 of HR 256 patches (what a GPU job uses), these input paths:

  default            `srtrain.data.train_dataset` with today's defaults: (lr, hr) float pairs
  patches2           the same with data.patches_per_image=2
  accelerator        degradation.on=replica: the pipeline yields uint8 HR + seeds; the
                     degradation runs on the GPU and is not counted as CPU work here
  cache+accelerator  data.decoded_cache=true + degradation.on=replica (skipped, with the
                     reason, where data.decoded_cache is not an option of this checkout)
  accelerator+patches2  degradation.on=replica + data.patches_per_image=2: where the decoded
                     cache does not fit, one JPEG window decode for two patches

and the accelerator path in two parts (`accelerator_parts`: CPU ms per pair of each, and the
rest): window_decode, its random windows decoded (flipped, turned, batched) from the photos held
in memory as encoded bytes, and shard_records, its records read from the shards and batched,
nothing decoded.

Each path's tf.data pipeline is built once (its functions traced: `pipeline_build_s`); each
repeat times every path in turn (a fresh iterator, `--warmup` batches untimed, which also
covers a cache fill; the time to the first batch is recorded apart), so machine noise hits all
paths alike; figures are medians over repeats. Per core, two ways:
  pairs_per_s_per_core  wall-clock pairs/s / the cores this process may use (sched_getaffinity)
  pairs_per_cpu_s       pairs / CPU seconds this process consumed (all threads): steadier on a
                        shared machine, and what a worker pays whatever its core count
cores_per_gpu = demand_img_per_s / pairs_per_s_per_core (cores_per_gpu_by_cpu_s from the other),
with demand_img_per_s = 5,600: Base U-Net bf16 at batch 64 on one H200, measured with
srtrain/models.py under Keras 3.15 on JAX (bench/README.md).

--iapr-scale (bench/results/feed_iapr.json). 20,000 JPEG photos the size of IAPR TC-12's (most
480x360, about a fifth portrait 360x480, a few other shapes with the short side >= 320; quality
75-85; random crops, resizes, flips and colour shifts of the photos bundled with scikit-image
and scikit-learn, so they compress like photos), written to a temp dir in IAPR's layout
(images/00..39/NNNNN.jpg), then `python -m srtrain.data build` (split 0.68/0.17/0.15), once
per --shard-size (128MB, the command's default, and 16MB), timed, with the peak resident memory
and open files of the build's process tree sampled. Then one worker's share at 8 workers (index
0 of 8):
the time to its first batch and its peak resident memory without the decoded cache and, where
the option exists, with data.decoded_cache=true (the cache fill). Nothing is written inside the
repository but the result file.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cpu_id import cpu_id

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
BSD200 = REPO.parent / "shared" / "datasets" / "bsd200"
# img/s: Base U-Net, bf16, batch 64, one NVIDIA H200, measured with srtrain/models.py (Keras 3.15,
# JAX backend)
DEMAND = 5600
PATHS = {
    "default": [],
    "patches2": ["data.patches_per_image=2"],
    "accelerator": ["degradation.on=replica"],
    "cache+accelerator": ["data.decoded_cache=true", "degradation.on=replica"],
    "accelerator+patches2": ["degradation.on=replica", "data.patches_per_image=2"],
}


def cpu_features() -> list[str]:
    """Which of the vector and matrix extensions that move these figures the CPU has: "AMD EPYC"
    names both AVX2-only and AVX-512 (bf16) models, which differ here by up to 2x."""
    flags = cpu_id()[1]
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    t = os.times()
    return t.user + t.system


def make_jpegs(src: Path, out: Path, quality: int) -> list[Path]:
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p in sorted(src.glob("*.png")):
        dst = out / f"{p.stem}.jpg"
        Image.open(p).convert("RGB").save(dst, quality=quality)
        files.append(dst)
    return files


def load_path(overrides: list[str]):
    """The Config of one path, or the ConfigError message when this checkout lacks an option."""
    from srtrain.config import ConfigError, load_config

    try:
        return load_config(None, overrides), None
    except ConfigError as e:
        return None, str(e)


def measure(ds, batch: int, batches: int, warmup: int, min_seconds: float = 1.0) -> dict:
    """Pairs/s (wall) and pairs per CPU-second of at least `batches` batches after `warmup`,
    from a fresh iterator over `ds`; more batches until `min_seconds` have passed, so that a
    fast path is not timed over a few hundredths of a second (CPU time counts in 10 ms ticks)."""
    import tensorflow as tf

    t_start = time.perf_counter()
    it = iter(ds)
    out = next(it)
    first = time.perf_counter() - t_start
    for _ in range(warmup - 1):
        next(it)
    t0, c0 = time.perf_counter(), cpu_seconds()
    n = 0
    while n < batches or time.perf_counter() - t0 < min_seconds:
        out = next(it)
        n += 1
    _ = sum(float(tf.reduce_sum(tf.cast(x[:1], tf.float32))) for x in out)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    del it
    pairs = n * batch
    return {
        "pairs_per_s": pairs / wall,
        "pairs_per_cpu_s": pairs / cpu,
        "first_batch_s": first,
        "delivers": [f"{x.dtype.name}{list(x.shape)}" for x in out],
    }


def feed(args) -> int:
    import tensorflow as tf

    from srtrain import data
    from srtrain.data import builder

    if not BSD200.is_dir():
        print(f"error: {BSD200} not found (the shared datasets)", file=sys.stderr)
        return 1
    cores = len(os.sched_getaffinity(0))
    work = Path(tempfile.mkdtemp(prefix="srtrain-feed-"))
    try:
        make_jpegs(BSD200, work / "jpeg", args.quality)
        local = work / "shards"
        builder.build(
            str(work / "jpeg"), str(local), split={"train": 1.0}, shard_size=2 * 2**20,
            progress=False,
        )  # fmt: skip
        base = [
            f"data.source={local}",
            f"data.patch_size={args.patch}",
            f"data.batch_size={args.batch}",
        ]
        datasets, skipped, build_s = {}, {}, {}
        for name, extra in PATHS.items():
            cfg, error = load_path([*base, *extra])
            if cfg is None:
                skipped[name] = f"config rejected on this checkout: {error}"
                continue
            t0 = time.perf_counter()  # tracing the pipeline's functions, once per path
            datasets[name] = data.train_dataset(cfg)
            build_s[name] = time.perf_counter() - t0
        acc_cfg = load_path([*base, *PATHS["accelerator"]])[0]
        if acc_cfg is not None:  # the accelerator path's parts, timed like the paths
            for name, make in PARTS.items():
                datasets[name] = make(acc_cfg)
        runs: dict[str, list[dict]] = {k: [] for k in datasets}
        load_before = os.getloadavg()
        for r in range(args.repeats):
            for name, ds in datasets.items():
                m = measure(ds, args.batch, args.batches, args.warmup)
                runs[name].append(m)
                print(
                    f"repeat {r + 1}/{args.repeats} {name:<20} {m['pairs_per_s']:7.0f} pairs/s "
                    f"{m['pairs_per_cpu_s']:7.0f} pairs/CPU-s  "
                    f"first batch {m['first_batch_s']:.1f} s",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    paths, parts = {}, {}
    for name, ms in runs.items():
        rate = statistics.median(m["pairs_per_s"] for m in ms)
        per_cpu_s = statistics.median(m["pairs_per_cpu_s"] for m in ms)
        if name in PARTS:
            parts[name] = {"pairs_per_s": round(rate, 1), "pairs_per_cpu_s": round(per_cpu_s, 1)}
            continue
        paths[name] = {
            "overrides": PATHS[name],
            "pairs_per_s": round(rate, 1),
            "pairs_per_s_per_core": round(rate / cores, 1),
            "cores_per_gpu": round(DEMAND / (rate / cores), 2),
            "pairs_per_cpu_s": round(per_cpu_s, 1),
            "cores_per_gpu_by_cpu_s": round(DEMAND / per_cpu_s, 2),
            "pipeline_build_s": round(build_s[name], 2),
            "first_batch_s": round(statistics.median(m["first_batch_s"] for m in ms), 2),
            "delivers": ms[0]["delivers"],
            "repeats": [
                {k: round(v, 2) if isinstance(v, float) else v for k, v in m.items()} for m in ms
            ],
        }
    for name, reason in skipped.items():
        paths[name] = {"overrides": PATHS[name], "skipped": reason}
    result = {
        "what": (
            "training pairs/s of the input pipeline alone, per CPU core; BSD200 (200 photos, "
            f"481x321) as JPEG quality {args.quality} in local shards"
        ),
        "demand_img_per_s": DEMAND,
        "demand": (
            "Base U-Net bf16, batch 64, one NVIDIA H200, measured with srtrain/models.py "
            "(Keras 3.15, JAX backend)"
        ),
        "per_core": {
            "pairs_per_s_per_core": "wall-clock pairs/s divided by the cores this process may use",
            "pairs_per_cpu_s": "pairs per CPU second this process consumed (all threads)",
            "cores_per_gpu": "demand_img_per_s / pairs_per_s_per_core",
            "cores_per_gpu_by_cpu_s": "demand_img_per_s / pairs_per_cpu_s",
        },
        "patch": args.patch,
        "batch": args.batch,
        "jpeg_quality": args.quality,
        "batches_timed": args.batches,
        "warmup_batches": args.warmup,
        "repeats": args.repeats,
        "statistic": "median over repeats",
        "cores": cores,
        "cpu_model": cpu_id()[0],
        "cpu_features": cpu_features(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "tensorflow": tf.__version__,
        "paths": paths,
    }
    if parts and "accelerator" in paths:
        result["accelerator_parts"] = accelerator_parts(paths["accelerator"], parts)
    write(args.out, result)
    for name, p in paths.items():
        if "skipped" in p:
            print(f"{name:<20} skipped: {p['skipped']}")
        else:
            print(
                f"{name:<20} {p['pairs_per_s_per_core']:7.0f} pairs/s per core -> "
                f"{p['cores_per_gpu']:5.2f} cores per GPU  ({p['pairs_per_cpu_s']:.0f} per "
                f"CPU-s -> {p['cores_per_gpu_by_cpu_s']:.2f})"
            )
    if "accelerator_parts" in result:
        ms = result["accelerator_parts"]["cpu_ms_per_pair"]
        print("accelerator, CPU ms per pair: " + ", ".join(f"{k} {v:.3f}" for k, v in ms.items()))
    return 0


def window_decodes(cfg):
    """Part of the accelerator path: random windows decoded from the photos held in memory as
    encoded bytes (no shard reading), flipped and turned, batched, as `train_dataset` does."""
    import tensorflow as tf

    from srtrain.data import shards
    from srtrain.data.ops import dataset_options, element_seed, random_patch

    size, seed = cfg.data.patch_size, cfg.train.seed
    rows = {"image": [], "height": [], "width": []}
    for r in shards.records(cfg, cfg.data.train_split, min_size=size):  # one pass
        for key, value in rows.items():
            value.append(r[key].numpy())
    ds = tf.data.Dataset.from_tensor_slices(rows).cache().repeat()
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed).enumerate()

    def patch(i, r):
        s = element_seed(seed, i)
        return random_patch(r["image"], r["height"], r["width"], size, s), s

    ds = ds.map(patch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(cfg.data.batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


def shard_records(cfg):
    """Part of the accelerator path: the training records read from the shards into tf.data,
    shuffled and numbered as `train_dataset` does, nothing decoded (each record's byte count
    stands in for its patch)."""
    import tensorflow as tf

    from srtrain.data import shards
    from srtrain.data.ops import dataset_options

    seed = cfg.train.seed
    ds = shards.records(cfg, cfg.data.train_split, 0, 1, cfg.data.patch_size, seed=seed)
    ds = ds.shuffle(cfg.data.shuffle_buffer, seed=seed).enumerate()
    ds = ds.map(lambda i, r: (tf.strings.length(r["image"]), i))
    ds = ds.batch(cfg.data.batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(dataset_options())


# The accelerator path in parts, timed in the same repeats: where its CPU time goes.
PARTS = {"window_decode": window_decodes, "shard_records": shard_records}


def accelerator_parts(path: dict, parts: dict) -> dict:
    """CPU milliseconds per pair of the accelerator path and of its two parts; the rest is what
    neither part covers (tf.data's per-element work between them, the flips' copies overlap)."""
    ms = {name: 1000 / p["pairs_per_cpu_s"] for name, p in parts.items()}
    whole = 1000 / path["pairs_per_cpu_s"]
    return {
        "what": (
            "CPU ms per pair (medians of pairs per CPU-s): the accelerator path; window_decode: "
            "random 256 windows decoded, flipped/turned and batched from encoded photos held in "
            "memory (no shard reading); shard_records: the records read from the shards, "
            "shuffled, numbered and batched, nothing decoded; rest: the path less both"
        ),
        "parts": parts,
        "cpu_ms_per_pair": {
            "accelerator": round(whole, 3),
            **{name: round(v, 3) for name, v in ms.items()},
            "rest": round(whole - sum(ms.values()), 3),
        },
    }


def write(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


# --- IAPR TC-12 scale ---------------------------------------------------------------------------

# (width, height, share): IAPR TC-12 is mostly 480x360 landscape, some portrait, min side 320.
SHAPES = ((480, 360, 0.72), (360, 480, 0.18), (480, 320, 0.05), (480, 400, 0.03), (320, 480, 0.02))


def _source_photos() -> list:
    import io

    import numpy as np
    from PIL import Image

    from srtrain.data import samples

    photos = []
    for split in samples.SPLITS:
        for _, blob in samples.read(split):
            photos.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")))
    return photos


def _generate_part(job: tuple) -> int:
    """Writes photos start, start + step, ... < n; returns the bytes written."""
    import numpy as np
    from PIL import Image

    out, start, step, n = job
    photos = _source_photos()
    shapes = [(w, h) for w, h, _ in SHAPES]
    shares = np.array([s for *_, s in SHAPES])
    written = 0
    for i in range(start, n, step):
        rng = np.random.default_rng(i)
        w, h = shapes[rng.choice(len(shapes), p=shares / shares.sum())]
        src = photos[rng.integers(len(photos))]
        sh, sw = src.shape[:2]
        # the largest crop of the target's aspect, scaled by 0.35-1, at a random position
        fit = min(sh / h, sw / w) * rng.uniform(0.35, 1.0)
        ch, cw = max(int(h * fit), 8), max(int(w * fit), 8)
        top, left = rng.integers(sh - ch + 1), rng.integers(sw - cw + 1)
        crop = src[top : top + ch, left : left + cw].astype(np.float32)
        crop = crop * rng.uniform(0.75, 1.25, 3) + rng.uniform(-20, 20, 3)  # colour shift
        img = Image.fromarray(np.clip(crop, 0, 255).astype(np.uint8)).resize(
            (w, h), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = out / f"{i // 500:02d}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=int(rng.integers(75, 86)))
        written += path.stat().st_size
    return written


def generate(out: Path, n: int, procs: int) -> dict:
    import multiprocessing

    t0, c0 = time.perf_counter(), _children_cpu()
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        sizes = pool.map(_generate_part, [(out, k, procs, n) for k in range(procs)])
    return {
        "images": n,
        "bytes": sum(sizes),
        "mean_kb": round(sum(sizes) / n / 1024, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(_children_cpu() - c0, 1),
    }


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _tree(pid: int) -> list[int]:
    """pid and its descendants (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _rss_and_fds(pids: list[int]) -> tuple[int, int, int]:
    """(summed RSS bytes, largest single RSS bytes, summed open fds) of `pids`."""
    total, largest, fds = 0, 0, 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                    total, largest = total + rss, max(largest, rss)
            fds += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total, largest, fds


def run_sampled(cmd: list[str], **kw) -> dict:
    """Runs `cmd`, sampling its process tree's memory and open files every 0.2 s."""
    peak = {"rss_tree": 0, "rss_largest": 0, "fds": 0, "processes": 0}
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    done = threading.Event()

    def sample():
        while not done.wait(0.2):
            pids = _tree(proc.pid)
            rss, largest, fds = _rss_and_fds(pids)
            peak["rss_tree"] = max(peak["rss_tree"], rss)
            peak["rss_largest"] = max(peak["rss_largest"], largest)
            peak["fds"] = max(peak["fds"], fds)
            peak["processes"] = max(peak["processes"], len(pids))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    return {
        "returncode": proc.returncode,
        "seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(_children_cpu() - c0, 1),
        "peak_rss_mb_process_tree": round(peak["rss_tree"] / 2**20),
        "peak_rss_mb_largest_process": round(peak["rss_largest"] / 2**20),
        "peak_open_fds_process_tree": peak["fds"],
        "peak_processes": peak["processes"],
        "stdout": stdout,
        "stderr": stderr,
    }


def build_shards(photos: Path, dest: Path, workers: int, shard_size: str) -> dict:
    run = run_sampled(
        [sys.executable, "-m", "srtrain.data", "build", str(photos), str(dest),
         "--workers", str(workers), "--shard-size", shard_size, "--no-progress"],
        cwd=REPO,
    )  # fmt: skip
    if run["returncode"] != 0:
        raise SystemExit(f"build failed: {run['stderr'][-2000:]}")
    manifest = json.loads((dest / "manifest.json").read_text())
    splits = {}
    for name, s in manifest["splits"].items():
        sizes = sorted(x["bytes"] for x in s["shards"])
        splits[name] = {
            "images": s["images"],
            "shards": len(sizes),
            "shard_mb_min_median_max": [
                round(sizes[0] / 2**20, 1),
                round(statistics.median(sizes) / 2**20, 1),
                round(sizes[-1] / 2**20, 1),
            ],
            "total_mb": round(sum(sizes) / 2**20, 1),
        }
    images = manifest["images"]
    return {
        "command": "python -m srtrain.data build PHOTOS DEST (default split 0.68/0.17/0.15) "
        f"--workers {workers} --shard-size {shard_size}",
        "seconds": run["seconds"],
        "images_per_s": round(images / run["seconds"], 1),
        "cpu_seconds": run["cpu_seconds"],
        "mb_per_s": round(sum(s["total_mb"] for s in splits.values()) / run["seconds"], 1),
        "images": images,
        "skipped": len(manifest["skipped"]),
        "splits": splits,
        "manifest_kb": round((dest / "manifest.json").stat().st_size / 1024, 1),
        "peak_rss_mb_process_tree": run["peak_rss_mb_process_tree"],
        "peak_rss_mb_largest_process": run["peak_rss_mb_largest_process"],
        "peak_open_fds_process_tree": run["peak_open_fds_process_tree"],
        "peak_processes": run["peak_processes"],
    }


_SHARE_SCRIPT = """
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
from srtrain import data
from srtrain.config import load_config
cfg = load_config(None, json.loads(sys.argv[1]))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
it = iter(data.train_dataset(cfg, index=0, count=8))
next(it)
first = time.perf_counter() - t0
t1 = time.perf_counter()
for _ in range(int(sys.argv[2])):
    next(it)
print(json.dumps({
    "first_batch_s": round(first, 1),
    "next_batches_per_s": round(int(sys.argv[2]) / (time.perf_counter() - t1), 2),
    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    "rss_mb_after_imports": round(rss0 / 1024),
}))
"""


def worker_share(dest: Path, overrides: list[str], batches: int) -> dict:
    """Index 0 of 8 input pipelines over the train split, in a fresh process: time to its first
    batch (a decoded cache is filled by then), then `batches` more, and its peak RSS."""
    cfg, error = load_path([f"data.source={dest}", *overrides])
    if cfg is None:
        return {"overrides": overrides, "skipped": f"config rejected on this checkout: {error}"}
    p = subprocess.run(
        [sys.executable, "-c", _SHARE_SCRIPT, json.dumps([f"data.source={dest}", *overrides]),
         str(batches)],
        cwd=REPO, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if p.returncode != 0:
        return {"overrides": overrides, "failed": p.stderr.strip().splitlines()[-1:]}
    return {"overrides": overrides, **json.loads(p.stdout.strip().splitlines()[-1])}


def cache_fill(dest: Path, batches: int) -> dict:
    """One worker's share at 8 workers with data.decoded_cache=true (skipped when missing)."""
    return worker_share(
        dest,
        ["data.decoded_cache=true", "degradation.on=replica", "data.patch_size=256",
         "data.batch_size=64"],
        batches,
    )  # fmt: skip


def iapr_scale(args) -> int:
    work = Path(args.work or tempfile.mkdtemp(prefix="srtrain-iapr-"))
    photos, stats = work / "images", work / "generation.json"
    keep = bool(args.work)
    builds = []
    try:
        if not stats.exists():
            print(f"generating {args.images} photos in {photos} ...", flush=True)
            stats.write_text(json.dumps(generate(photos, args.images, args.procs)))
        gen = json.loads(stats.read_text())
        print(f"  {gen}", flush=True)
        for size in args.shard_size.split(","):
            dest = work / f"shards-{size}"
            shutil.rmtree(dest, ignore_errors=True)
            print(f"building shards in {dest} ...", flush=True)
            build = build_shards(photos, dest, args.procs, size)
            print(f"  {build}\none worker's share at 8 workers ...", flush=True)
            share = worker_shares(dest, build["splits"]["train"]["shards"], args.share_batches)
            print(f"  {share}", flush=True)
            builds.append({"shard_size": size, "build": build, "worker_share": share})
            shutil.rmtree(dest, ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    write(
        args.out_iapr,
        {
            "what": "IAPR TC-12-sized synthetic photo set: generation, shard build, one "
            "worker's share at 8 workers",
            "cpu_model": cpu_id()[0],
            "cpu_features": cpu_features(),
            "cores": len(os.sched_getaffinity(0)),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "photos": {
                "shapes_w_h_share": [list(s) for s in SHAPES],
                "jpeg_quality": "75-85 (uniform per photo)",
                "content": "random crops, resizes, flips and colour shifts of the photos "
                "bundled with scikit-image and scikit-learn",
                **gen,
            },
            "builds": builds,
        },
    )
    return 0


def worker_shares(dest: Path, train_shards: int, batches: int) -> dict:
    base = ["degradation.on=replica", "data.patch_size=256", "data.batch_size=64"]
    return {
        "workers": 8,
        "train_shards": train_shards,
        # The split's rows are dealt in contiguous equal ranges: a worker reads the row groups
        # of its eighth, from however many shards that range touches.
        "worker_reads": "an eighth of the train images, a contiguous range of rows",
        "no_cache": worker_share(dest, base, batches),
        "decoded_cache": cache_fill(dest, batches),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="3 repeats x 10 batches or 1 s each (about 2 minutes)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--batches",
        type=int,
        default=40,
        help="timed batches per measurement (at least; more until 1 s has passed)",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of the BSD200 photos")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "feed.json"))
    p.add_argument("--iapr-scale", action="store_true", help="the IAPR TC-12-sized run instead")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--procs", type=int, default=2, help="processes generating and building")
    p.add_argument("--share-batches", type=int, default=10)
    p.add_argument(
        "--shard-size",
        default="128MB,16MB",
        help="build's --shard-size, one build each (128MB: the command's default)",
    )
    p.add_argument("--work", default="", help="keep (and reuse) photos here (default: temp)")
    p.add_argument("--out-iapr", default=str(REPO / "bench" / "results" / "feed_iapr.json"))
    args = p.parse_args(argv)
    if args.iapr_scale:
        return iapr_scale(args)
    if args.quick:
        args.repeats, args.batches, args.warmup = 3, 10, 3
    return feed(args)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
