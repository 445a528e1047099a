"""Training throughput (images/s) of srtrain against the original notebook's way of training.

    python bench/train_throughput.py            # full: Base and Advanced, fp32 and bf16, 4 modes
    python bench/train_throughput.py --quick    # a few minutes: Base, fp32, fewer steps
    python bench/train_throughput.py --report   # the table of bench/results/train_throughput.json

Modes, each in a fresh process so no mode inherits another's TensorFlow state:
  r  reference: srtrain.models.build_unet trained with Keras `Model.fit` (Adam 5e-4, MAE), the
     way the original notebook trained, in one process
  l  `python -m srtrain.run --local` (our custom loop, no Ray)
  1  `python -m srtrain.run` with 1 Ray Train worker (2 CPUs)
  2  `python -m srtrain.run` with 2 Ray Train workers x 1 CPU (MultiWorkerMirroredStrategy;
     batch 8 per worker, so global batch 16; figures are images/s over both workers)

Every mode trains on the same input: srtrain's samples pipeline (bundled photos, random 256x256
HR crops, the original degradation to 128x128 LR, batch 8), built by `srtrain.data.train_dataset`.
Every training process gets the same CPU threads per CPU it owns (TF_NUM_INTRAOP_THREADS and
OMP_NUM_THREADS = 2 for r, l and 1; 1 per worker for 2).

Steady state: a run trains 1 warm-up epoch (tracing, oneDNN kernel selection, caches) and then
`--repeats` measured epochs of `--steps` steps; a mode's figure is the median of its measured
epochs' images/s (train steps only, validation excluded), and of their images per CPU-second
of the mode's whole process tree (sampled from /proc at each epoch's row; the steady measure on a
shared machine). r, l, 1 and 2 run back to back for
each model and precision, so their ratios compare measurements taken minutes apart on a machine
whose load changes. Results: bench/results/train_throughput.json (or --out).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from cpu_id import cpu_id

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
MODES = {
    "r": "reference Keras fit",
    "l": "--local loop",
    "1": "Ray, 1 worker x 2 CPU",
    "2": "Ray, 2 workers x 1 CPU",
}
THREADS = {"r": 2, "l": 2, "1": 2, "2": 1}  # per training process


def job_overrides(arch: str, precision: str, steps: int, repeats: int) -> list[str]:
    sets = {
        "data.source": "samples",
        "data.patch_size": 256,
        "data.val_patch_size": 256,
        "data.batch_size": 8,
        "data.val_images": 1,
        "model.arch": arch,
        "model.filters": 64,
        "loss.kind": "mae",
        "train.lr": 5e-4,
        "train.precision": precision,
        "train.epochs": 1 + repeats,
        "train.steps_per_epoch": steps,
        "train.val_steps": 1,
        "train.early_stop_patience": 0,
        "train.sample_images": 0,
    }
    return [f"{k}={v}" for k, v in sets.items()]


def child_env(threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_NUM_INTRAOP_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    return env


# --- r: the reference, run in a child process of this script ---------------------------------


def reference(overrides: list[str], rows_file: str) -> dict:
    """Keras fit on the samples pipeline; images/s of each epoch's training (no validation)."""
    import keras

    from srtrain import data, models
    from srtrain.config import load_config
    from srtrain.train import dtype_policy

    cfg = load_config(None, overrides)
    keras.utils.set_random_seed(cfg.train.seed)
    policy = dtype_policy(cfg.train.precision)
    model = models.from_config(cfg.model, cfg.degradation.scale, dtype=policy)
    model.compile(optimizer=keras.optimizers.Adam(cfg.train.lr), loss="mae")
    ds = data.train_dataset(cfg)  # (lr, hr) batches, endless

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.rates: list[float] = []

        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds = time.perf_counter() - self.t0
            self.rates.append(cfg.train.steps_per_epoch * cfg.data.batch_size / seconds)
            # the parent samples CPU time when a row appears, as with srtrain.run's metrics.jsonl
            with open(rows_file, "a") as f:
                f.write(json.dumps({"epoch": epoch + 1}) + "\n")

    timer = Timer()
    model.fit(
        ds,
        epochs=cfg.train.epochs,
        steps_per_epoch=cfg.train.steps_per_epoch,
        callbacks=[timer],
        verbose=0,
    )
    return {"epoch_images_per_sec": timer.rates, "precision": policy}


def tree_cpu_seconds(root: int) -> float:
    """user + system CPU seconds of a process and all its living descendants (from /proc)."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += stats.get(pid, (0, 0))[1]
        todo += [c for c, (ppid, _) in stats.items() if ppid == pid]
    return total / os.sysconf("SC_CLK_TCK")


def sample_cpu_per_row(proc: subprocess.Popen, rows_file: Path, timeout: float) -> list[float]:
    """Polls until `proc` ends: the process tree's CPU seconds each time a row (one per epoch)
    is appended to `rows_file`. On a shared machine CPU time per image is the steady measure;
    wall time depends on who else runs."""
    deadline, marks, rows = time.monotonic() + timeout, [], 0
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise subprocess.TimeoutExpired(proc.args, timeout)
        try:
            n = len(rows_file.read_text().splitlines())
        except OSError:
            n = 0
        if n > rows:
            marks += [tree_cpu_seconds(proc.pid)] * (n - rows)
            rows = n
        time.sleep(0.2)
    return marks


# --- l, 1, 2: srtrain.run ----------------------------------------------------------------------


def run_mode(
    mode: str, overrides: list[str], workdir: Path, timeout: float, steps_x_batch: int
) -> dict:
    env = child_env(THREADS[mode])
    t0 = time.time()
    if mode == "r":
        cmd = [sys.executable, __file__, "--_reference", json.dumps(overrides)]
    name = f"{mode}-{int(t0 * 1000)}"
    if mode != "r":
        cmd = [sys.executable, "-m", "srtrain.run", "--output", str(workdir), "--name", name]
        for o in overrides:
            cmd += ["--set", o]
        if mode == "l":
            cmd.append("--local")
        else:
            cmd += [
                "--set",
                f"scaling.num_workers={int(mode)}",
                "--set",
                f"scaling.cpus_per_worker={2 // int(mode)}",
            ]
    rows_file = workdir / name / "metrics.jsonl"
    if mode == "r":
        rows_file = workdir / f"r-{int(t0 * 1000)}.jsonl"
        cmd += ["--_rows", str(rows_file)]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
        )
        cpu_marks = sample_cpu_per_row(proc, rows_file, timeout)
        log.seek(0)
        text = log.read()
    if proc.returncode != 0:
        raise RuntimeError(
            f"mode {mode} failed ({proc.returncode}): {shlex.join(cmd)}\n{text[-2500:]}"
        )
    if mode == "r":
        out = json.loads(text.strip().splitlines()[-1])
        rates = out["epoch_images_per_sec"]
    else:
        rows = [json.loads(r) for r in rows_file.read_text().splitlines()]
        rates = [r["images_per_sec"] for r in rows]
        out = {"input_wait": [round(r["input_wait"], 4) for r in rows[1:]]}
    # CPU seconds between consecutive epoch rows: the next epoch's steps and validation, plus
    # (srtrain.run) the checkpoint of the previous one; for Ray, the whole Ray node's processes.
    images = steps_x_batch * (int(mode) if mode in ("1", "2") else 1)
    cpu_rates = [images / (b - a) for a, b in itertools.pairwise(cpu_marks) if b > a]
    measured = rates[1:]  # epoch 1 is the warm-up
    out.update(
        images_per_sec=round(statistics.median(measured), 3),
        images_per_cpu_s=round(statistics.median(cpu_rates), 3) if cpu_rates else None,
        epoch_images_per_cpu_s=[round(r, 3) for r in cpu_rates],
        epoch_images_per_sec=[round(r, 3) for r in rates],
        warmup_images_per_sec=round(rates[0], 3),
        process_seconds=round(time.time() - t0, 1),
        threads_per_process=THREADS[mode],
    )
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def machine() -> dict:
    cpu, flags = cpu_id()
    import keras
    import ray
    import tensorflow as tf

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "ray": ray.__version__,
        "platform": platform.platform(),
    }


def report(result: dict) -> str:
    """The markdown tables of a results file (bench/README.md quotes them)."""
    modes = list(result["setup"]["modes"])
    ratio_keys = [k for k in ("l/r", "1/l", "2/1") if k[0] in modes and k[2] in modes]
    lines = []
    for field, unit in (("images_per_sec", "images/s"), ("images_per_cpu_s", "images/CPU-s")):
        suffix = " cpu" if field == "images_per_cpu_s" else ""
        lines += [
            f"| {unit} | "
            + " | ".join(f"{m}: {MODES[m]}" for m in modes)
            + " | "
            + " | ".join(ratio_keys)
            + " |",
            "|" + " --- |" * (1 + len(modes) + len(ratio_keys)),
        ]
        for key, runs in result["runs"].items():
            cells = []
            for m in modes:
                v = runs.get(m, {}).get(field)
                cells.append(f"{v:.2f}" if v else ("failed" if "error" in runs.get(m, {}) else "-"))
            r = result.get("ratios", {}).get(key, {})
            cells += [f"{r[k + suffix]:.2f}" if r.get(k + suffix) else "-" for k in ratio_keys]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
        bf = [
            (k, v)
            for k, v in result.get("ratios", {}).items()
            if "bf16/fp32" in k and v and k.endswith(" cpu") == bool(suffix)
        ]
        if bf:
            lines += [
                "",
                f"bf16/fp32 ({unit}): "
                + ", ".join(
                    f"{k.replace(' bf16/fp32', '').replace(' cpu', '')} {v:.2f}" for k, v in bf
                ),
            ]
        lines.append("")
    return "\n".join(lines).rstrip()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="a short run: Base, fp32, 3 steps x 2 measured epochs"
    )
    p.add_argument("--models", default="base,advanced")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--modes", default="r,l,1,2")
    p.add_argument("--steps", type=int, default=6, help="steps per epoch")
    p.add_argument("--repeats", type=int, default=3, help="measured epochs after the warm-up")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per mode run")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train_throughput.json"))
    p.add_argument(
        "--report",
        action="store_true",
        help="print the markdown table of the results file (--out) and exit",
    )
    p.add_argument("--_reference", help=argparse.SUPPRESS)
    p.add_argument("--_rows", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._reference:
        print(json.dumps(reference(json.loads(args._reference), args._rows)), flush=True)
        return 0
    if args.report:
        print(report(json.loads(Path(args.out).read_text())))
        return 0
    if args.quick:
        args.models, args.precisions, args.steps, args.repeats = "base", "fp32", 3, 2
    models = args.models.split(",")
    precisions = args.precisions.split(",")
    modes = args.modes.split(",")

    started = datetime.now(UTC)
    result = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/train_throughput.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "load_average_start": os.getloadavg(),
        "setup": {
            "hr_patch": 256,
            "lr_patch": 128,
            "batch_per_replica": 8,
            "steps_per_epoch": args.steps,
            "warmup_epochs": 1,
            "measured_epochs": args.repeats,
            "input": "srtrain samples pipeline (srtrain.data.train_dataset), same for every mode",
            "figure": "median images/s over the measured epochs (training steps only)",
            "modes": {m: MODES[m] for m in modes},
            "threads_per_process": {m: THREADS[m] for m in modes},
        },
        "runs": {},
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="srtrain-bench-") as tmp:
        for arch in models:
            for precision in precisions:
                key = f"{arch}/{precision}"
                overrides = job_overrides(arch, precision, args.steps, args.repeats)
                runs = result["runs"].setdefault(key, {})
                for mode in modes:
                    print(f"{key} {mode} ({MODES[mode]}) ...", end=" ", flush=True)
                    try:
                        runs[mode] = run_mode(
                            mode, overrides, Path(tmp), args.timeout, args.steps * 8
                        )
                        print(
                            f"{runs[mode]['images_per_sec']:.2f} img/s, "
                            f"{runs[mode]['images_per_cpu_s']} img/CPU-s "
                            f"(epochs {runs[mode]['epoch_images_per_sec']})",
                            flush=True,
                        )
                    except (RuntimeError, subprocess.TimeoutExpired) as e:
                        runs[mode] = {"error": str(e)[-2500:]}
                        print(f"FAILED\n{e}", flush=True)
                    out_path.write_text(json.dumps(result, indent=2) + "\n")  # partial results

    def ips(key: str, mode: str, field: str) -> float | None:
        return result["runs"].get(key, {}).get(mode, {}).get(field)

    ratios: dict = {}
    for field, suffix in (("images_per_sec", ""), ("images_per_cpu_s", " cpu")):
        for key in result["runs"]:
            for a, b in (("l", "r"), ("1", "l"), ("2", "1")):
                ratios.setdefault(key, {})[f"{a}/{b}{suffix}"] = ratio(
                    ips(key, a, field), ips(key, b, field)
                )
        for arch in models:
            for mode in modes:
                ratios[f"{arch} bf16/fp32 {mode}{suffix}"] = ratio(
                    ips(f"{arch}/bf16", mode, field), ips(f"{arch}/fp32", mode, field)
                )
    result["ratios"] = ratios
    result["load_average_end"] = os.getloadavg()
    result["wall_minutes"] = round((datetime.now(UTC) - started).total_seconds() / 60, 1)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
