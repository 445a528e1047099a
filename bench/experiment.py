"""The original project's five-model experiment, CPU-sized, end to end on ../shared/datasets.

    python bench/experiment.py            # about 25 minutes on 2 CPU cores
    python bench/experiment.py --quick    # a few minutes: checks the pipeline, figures meaningless

1. Shards: bsd200 + t91 (290 photos; t91's 78x78 image is below --min-size and skipped), split
   train/val/test 0.8/0.1/0.1, built once with `python -m srtrain.data build` under --work.
2. VGG19 weights for the perceptual runs: ImageNet weights cannot be downloaded here, so a
   RANDOMLY INITIALISED VGG19 (seed 0) is saved and `loss.vgg_weights` points at it. The
   perceptual runs therefore say nothing about an ImageNet-VGG perceptual loss; they only show
   that the composite path trains.
3. The five jobs/experiments/exp*.yaml configs, unchanged except for the data source and a short
   schedule (--patch, --filters, --epochs x --steps, --precision), via `python -m srtrain.run
   --local`. A run whose result.json already exists for the same schedule is reused (--fresh
   retrains).
4. `python -m srtrain.compare` over the five runs (the shards' test split, protocol `seed`), and
   `python -m srtrain.evaluate` of the five best checkpoints on set14 (whole images) with
   `--protocol seed` and `--protocol standard`.
5. Figures to bench/results/experiment.json (experiment-quick.json with --quick) and the three
   markdown tables to bench/results/experiment.md.

Run outputs (shards, runs, reports) stay under --work (default /tmp/srtrain-exp), outside the repo.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
DATASETS = REPO.parent / "shared" / "datasets"
EXPERIMENTS = [
    "exp1-base-mae",
    "exp2-advanced-mae",
    "exp3-advanced-vgg-b2c2-0.005",
    "exp4-advanced-vgg-b5c4-0.005",
    "exp5-advanced-vgg-b5c4-0.02",
]
# The original's test results on IAPR TC-12 (RGB PSNR / SSIM, 256 center crops): README.md,
# "The original project".
ORIGINAL = {
    "exp1-base-mae": (25.78, 0.699),
    "exp2-advanced-mae": (25.41, 0.679),
    "exp3-advanced-vgg-b2c2-0.005": (24.98, 0.647),
    "exp4-advanced-vgg-b5c4-0.005": (25.38, 0.677),
    "exp5-advanced-vgg-b5c4-0.02": (25.45, 0.682),
}
FULL = {"patch": 96, "filters": 32, "epochs": 5, "steps": 100, "precision": "bf16", "limit": 0}
QUICK = {"patch": 48, "filters": 8, "epochs": 1, "steps": 5, "precision": "bf16", "limit": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny schedule to check the pipeline")
    p.add_argument("--work", default="/tmp/srtrain-exp", help="shards, runs and reports go here")
    p.add_argument("--datasets", default=str(DATASETS), help="../shared/datasets")
    p.add_argument("--patch", type=int, help=f"HR patch side (default {FULL['patch']})")
    p.add_argument("--filters", type=int, help=f"U-Net base filters (default {FULL['filters']})")
    p.add_argument("--epochs", type=int, help=f"default {FULL['epochs']}")
    p.add_argument("--steps", type=int, help=f"steps per epoch (default {FULL['steps']})")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"])
    p.add_argument("--only", nargs="+", choices=EXPERIMENTS, help="a subset of the five runs")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument("--out", help="results JSON (default bench/results/experiment[-quick].json)")
    return p.parse_args(argv)


def schedule(args: argparse.Namespace) -> dict:
    base = QUICK if args.quick else FULL
    return {k: getattr(args, k, None) or v for k, v in base.items()}


def run(cmd: list[str], log: Path | None = None) -> float:
    """Runs a project command from the repo root; its output goes to `log` (or through)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("RAY_ADDRESS", None)
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    if log is None:
        p = subprocess.run(cmd, cwd=REPO, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as f:
            p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        if log is not None:
            sys.stderr.write("".join(log.read_text().splitlines(keepends=True)[-20:]))
        raise SystemExit(f"failed (exit {p.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - t0


# The experiment's shard build: t91's 78x78 image is below the minimum size.
BUILD = ["--min-size", "96", "--split", "train=0.8,val=0.1,test=0.1"]


def build_shards(datasets: Path, shards: Path, options: list[str] = BUILD) -> None:
    """Shards of bsd200 + t91 under `shards` (kept if built), with `srtrain.data build` options."""
    if (shards / "manifest.json").is_file():
        print(f"shards: {shards} (exists)")
        return
    for name in ("bsd200", "t91", "set14"):
        if not (datasets / name).is_dir():
            raise SystemExit(f"{datasets / name}: missing (see ../shared/datasets/README.md)")
    # [bt]* = bsd200 and t91, not set5/set14 (the evaluation sets).
    src = f"{datasets}/[bt]*/*.png"
    cmd = [sys.executable, "-m", "srtrain.data", "build", src, str(shards), *options]
    run([*cmd, "--no-progress"])


def random_vgg19(path: Path) -> None:
    """A randomly initialised VGG19 (no top) weights file: ImageNet weights are not reachable."""
    if path.is_file():
        return
    code = (
        "import keras, sys; keras.utils.set_random_seed(0); "
        "keras.applications.VGG19(weights=None, include_top=False).save_weights(sys.argv[1])"
    )
    run([sys.executable, "-c", code, str(path)])


def train(name: str, sched: dict, shards: Path, vgg: Path, runs: Path, fresh: bool) -> dict:
    run_dir = runs / name
    result_file = run_dir / "result.json"
    if result_file.is_file() and not fresh:
        print(f"{name}: reusing {run_dir}")
    else:
        sets = {
            "data.source": shards,
            "data.patch_size": sched["patch"],
            "model.filters": sched["filters"],
            "train.epochs": sched["epochs"],
            "train.steps_per_epoch": sched["steps"],
            "train.precision": sched["precision"],
            "train.sample_images": 3,
        }
        cfg = yaml.safe_load((REPO / "jobs" / "experiments" / f"{name}.yaml").read_text())
        if cfg["loss"]["kind"] == "composite":
            sets["loss.vgg_weights"] = vgg
        cmd = [sys.executable, "-m", "srtrain.run", "--local"]
        cmd += ["--config", f"jobs/experiments/{name}.yaml"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        cmd += ["--output", str(runs), "--name", name]
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        elif run_dir.exists():
            cmd.append("--resume")  # an interrupted run continues from its latest checkpoint
        seconds = run(cmd, runs / f"{name}.log")
        print(f"{name}: {seconds:.0f} s")
    result = json.loads(result_file.read_text())
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"run_dir": str(run_dir), "result": result, "epochs": epochs}


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sched = schedule(args)
    work = Path(args.work)
    shards = work / "shards"
    vgg = work / "vgg19-random.weights.h5"
    tag = "p{patch}-f{filters}-e{epochs}x{steps}-{precision}".format(**sched)
    runs, reports = work / "runs" / tag, work / "reports" / tag
    names = args.only or EXPERIMENTS
    t0 = time.perf_counter()

    build_shards(Path(args.datasets), shards)
    random_vgg19(vgg)
    trained = {n: train(n, sched, shards, vgg, runs, args.fresh) for n in names}
    train_seconds = time.perf_counter() - t0

    compare = [sys.executable, "-m", "srtrain.compare", *[str(runs / n) for n in names]]
    run([*compare, "--out", str(reports / "compare"), "--no-progress"])
    checkpoints = [trained[n]["result"]["checkpoint"] for n in names]
    evals = {}
    for protocol in ("seed", "standard"):
        out = reports / f"set14-{protocol}"
        cmd = [sys.executable, "-m", "srtrain.evaluate", "--checkpoint", *checkpoints]
        # Relative to the repo root (where `run` starts commands), so reports name no local path.
        set14 = os.path.relpath(Path(args.datasets, "set14").resolve(), REPO)
        cmd += ["--data", set14, "--protocol", protocol]
        cmd += ["--out", str(out), "--limit", str(sched["limit"]), "--no-progress"]
        run(cmd)
        evals[protocol] = json.loads((out / "report.json").read_text())

    manifest = json.loads((shards / "manifest.json").read_text())
    splits = {k: v["images"] for k, v in manifest["splits"].items()}
    compare_md = (reports / "compare" / "compare.md").read_text()
    report_md = {p: (reports / f"set14-{p}" / "report.md").read_text() for p in evals}
    caveats = [
        f"Short CPU schedule: {sched['epochs']} epochs x {sched['steps']} steps x batch 8 "
        f"({sched['epochs'] * sched['steps'] * 8:,} training patches of {sched['patch']}x"
        f"{sched['patch']}) with {sched['filters']} base filters, against the original's 50 "
        "epochs x 1,700 steps of 256x256 patches at 64 filters. The models are far from "
        "converged; the ranking says little about the original's.",
        "The perceptual runs (exp3-exp5) use a RANDOMLY INITIALISED VGG19 (ImageNet weights "
        "cannot be downloaded here), so their figures say nothing about an ImageNet-VGG "
        "perceptual loss.",
        f"Training data: bsd200 + t91 ({manifest['images']} photos: {splits['train']} train, "
        f"{splits['val']} val, {splits['test']} test), not IAPR TC-12 (13,600 train).",
    ]
    out = {
        "what": "the original five-model experiment, CPU-sized (bench/experiment.py)",
        "command": "python bench/experiment.py" + (" --quick" if args.quick else ""),
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "python": platform.python_version(),
        },
        "schedule": {**sched, "batch": 8, "lr": 5e-4, "shards": splits},
        "wall_seconds": {"train": round(train_seconds, 1), "total": None},
        "caveats": caveats,
        "runs": {
            n: {
                "best_epoch": t["result"]["best_epoch"],
                "val_psnr": t["result"]["val_psnr"],
                "val_ssim": t["result"]["val_ssim"],
                "bicubic_val_psnr": t["result"]["bicubic_psnr"],
                "images_per_sec": t["result"]["images_per_sec"],
                "wall_seconds": t["result"].get("wall_seconds"),
                "precision": t["result"]["precision"],
                "epochs": [
                    {k: e[k] for k in ("epoch", "train_loss", "val_psnr", "bicubic_psnr", "lr")}
                    for e in t["epochs"]
                ],
                "original_iaprtc12": dict(zip(("psnr", "ssim"), ORIGINAL[n], strict=True)),
            }
            for n, t in trained.items()
        },
        "compare_test_split": read_csv(reports / "compare" / "compare.csv"),
        "set14": {
            p: {k: r[k] for k in ("protocol", "protocol_description", "images", "rows", "skipped")}
            for p, r in evals.items()
        },
        "tables_md": {"compare": compare_md, **{f"set14_{p}": t for p, t in report_md.items()}},
    }
    out["wall_seconds"]["total"] = round(time.perf_counter() - t0, 1)
    path = (
        Path(args.out) if args.out else RESULTS / f"experiment{'-quick' if args.quick else ''}.json"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    md = path.with_suffix(".md")
    md.write_text(
        f"<!-- written by `{out['command']}`; schedule {tag} -->\n\n"
        + "\n".join(f"- {c}" for c in caveats)
        + "\n\n"
        + compare_md.replace("# ", "## ", 1)
        + "\n"
        + "\n".join(t.replace("# ", "## ", 1) for t in report_md.values())
    )
    print(f"results: {path}, {md}; run outputs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
