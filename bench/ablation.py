"""Ablation of the quality recipe: each option with and without, at the same wall-time budget.

    python bench/ablation.py                       # every row, 1,200 training steps each
    python bench/ablation.py --only recipe no-ema  # some rows
    python bench/ablation.py --only recipe --seeds 2077 2078 2079   # error bars over seeds
    python bench/ablation.py --job jobs/quality-advanced.yaml --only recipe bn-0.99
    python bench/ablation.py --minutes 10          # a wall-time budget instead of a step budget
    python bench/ablation.py --steps 100 --quick   # checks the harness; figures meaningless
    python bench/ablation.py --set data.batch_size=16 --set train.steps_per_epoch=200 ...
                                                   # every row on a variant of the job

Every row is `jobs/quality-base.yaml` (or --job) run as its first line says, on shards of
../shared/datasets bsd200 + t91 built as that line builds them, with `--set` overrides and one
budget for all: `--steps` (default; train.epochs set to it, the time limit off, so the cosine
schedule is planned over exactly those steps) or `--minutes` (train.time_limit_minutes: the run
stops at the epoch end after which another epoch would pass it, the cosine re-planned to end
there). A step budget compares options at equal work whatever else runs on the machine; a
wall-time budget is what the job's own limit does, but on a shared machine its step counts
follow the load (each row reports its steps and images/s).

Each row's best checkpoint (chosen on the validation split) is then scored on the build's test
split (the run's last line) and on Set14, whole images (`srtrain.evaluate --protocol seed`),
each beside bicubic upscaling of the same degraded input. Rows run one after another, never at
once (2 cores). A row whose result.json and Set14 report exist under --work for the same budget
is reused (--fresh retrains). Figures go to bench/results/ablation-JOB-Nmin[-quick].json; rows
measured by an earlier command into the same file stay (each row holds the seeds it was last
run with), so the table can be filled a few rows at a time. Rows compare only against rows of
the same recipe: the file and the run folders carry a digest of the job's resolved config with
the command's `--set`s (`config_digest`), and when the job has changed since a file was
written, the figures go to ablation-JOB-BUDGET-DIGEST.json beside it instead of mixing in.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

from experiment import DATASETS, REPO, RESULTS, build_shards, run
from train_throughput import machine

from srtrain.config import load_config, to_dict

# name: (what it changes, --set overrides of the job)
ROWS = {
    "recipe": ("the job as it stands", []),
    "plateau": (
        "the original's plateau schedule at the plain run's lr 1e-3, no warmup (cosine off)",
        ["train.schedule=plateau", "train.warmup_steps=0", "train.lr=1e-3"],
    ),
    "no-ema": ("validate and export the raw weights (EMA off)", ["train.ema_decay=0"]),
    "no-clip": ("no gradient clipping", ["train.grad_clip_norm=0"]),
    "lr-4e-3": ("peak lr 4e-3 instead of 2e-3", ["train.lr=4e-3"]),
    "patch160": (
        "HR patch 160 x batch 10 (about the pixels of 128 x 16)",
        ["data.patch_size=160", "data.batch_size=10"],
    ),
    "channel-shuffle": ("a random channel order per patch", ["data.channel_shuffle=true"]),
    "mse-tail": (
        "the last 25% of the planned steps on MSE (at MAE's gradient size), the rest on MAE",
        ["loss.mse_final_fraction=0.25"],
    ),
    "mse-half": (
        "the last 50% of the planned steps on MSE, the rest on MAE",
        ["loss.mse_final_fraction=0.5"],
    ),
    "mse-3q": (
        "the last 75% of the planned steps on MSE, the rest on MAE",
        ["loss.mse_final_fraction=0.75"],
    ),
    "bn-0.99": ("BatchNorm momentum 0.99, Keras' default", ["model.bn_momentum=0.99"]),
}
# Rows that change nothing for a job without BatchNorm (the Base U-Net).
BATCH_NORM_ROWS = {"bn-0.99"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", default="jobs/quality-base.yaml")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=1200, help="training steps per run")
    budget.add_argument("--minutes", type=float, help="wall-time budget per run instead")
    p.add_argument("--only", nargs="+", choices=list(ROWS), help="a subset of the rows")
    p.add_argument("--seeds", type=int, nargs="+", default=[2077], help="train.seed of each run")
    p.add_argument("--quick", action="store_true", help="50-step epochs: checks the harness")
    p.add_argument("--work", default="/tmp/srtrain-ablation", help="shards, runs and reports")
    p.add_argument("--datasets", default=str(DATASETS), help="../shared/datasets")
    p.add_argument("--fresh", action="store_true", help="retrain rows that already finished")
    p.add_argument("--out", help="results JSON (default bench/results/ablation-JOB-BUDGET.json)")
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override of the job for every row (repeatable), before the row's own",
    )
    return p.parse_args(argv)


def config_digest(job: str, sets: list[str]) -> str:
    """What the rows' recipe is: a digest of the job's resolved config with `sets` applied
    (comments, key order and the command's other flags do not change it)."""
    cfg = to_dict(load_config(REPO / job, sets))
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def build_options(job: str) -> list[str]:
    """The build options of the job's first line (`... build "GLOB" DIR [options] && ...`)."""
    first = (REPO / job).read_text().splitlines()[0]
    words = shlex.split(first.lstrip("# ").split("&&")[0])
    return words[words.index("DIR") + 1 :]


def train_and_score(name: str, seed: int, args, shards: Path, runs: Path, reports: Path) -> dict:
    """One row at one seed: train (or reuse), evaluate on Set14 (or reuse), its figures."""
    sets = args.sets + ROWS[name][1] + [f"data.source={shards}", f"train.seed={seed}"]
    if args.quick:
        sets += ["train.steps_per_epoch=50", "train.warmup_steps=20"]
    if args.minutes:
        sets.append(f"train.time_limit_minutes={args.minutes}")
    else:
        job = load_config(REPO / args.job, args.sets)
        per_epoch = 50 if args.quick else job.train.steps_per_epoch
        if args.steps % per_epoch:
            raise SystemExit(f"--steps: a multiple of the job's {per_epoch} steps per epoch")
        sets += [f"train.epochs={args.steps // per_epoch}", "train.time_limit_minutes=0"]
    run_name = f"{name}-s{seed}"
    run_dir, set14 = runs / run_name, reports / f"{run_name}-set14"
    if args.fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(set14, ignore_errors=True)
    if not (run_dir / "result.json").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "srtrain.run", "--config", args.job]
        for s in sets:
            cmd += ["--set", s]
        seconds = run([*cmd, "--output", str(runs), "--name", run_name], runs / f"{run_name}.log")
        print(f"{run_name}: {seconds:.0f} s", flush=True)
    else:
        print(f"{run_name}: reusing {run_dir}")
    result = json.loads((run_dir / "result.json").read_text())
    if not (set14 / "report.json").is_file():
        data = os.path.relpath(Path(args.datasets, "set14").resolve(), REPO)
        cmd = [sys.executable, "-m", "srtrain.evaluate", "--checkpoint", result["checkpoint"]]
        run([*cmd, "--data", data, "--protocol", "seed", "--out", str(set14), "--no-progress"])
    report = json.loads((set14 / "report.json").read_text())
    model, bicubic = report["rows"][0], next(r for r in report["rows"] if r["method"] == "bicubic")
    epochs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    return {
        "steps": result["steps"],
        "images_per_sec": round(result["images_per_sec"], 1),
        "val_psnr": result["val_psnr"],
        "val_bicubic_psnr": result["bicubic_psnr"],
        "val_psnr_per_epoch": [round(e["val_psnr"], 3) for e in epochs],
        "worst_drop_after_epoch_2": worst_drop([e["val_psnr"] for e in epochs], after=2),
        "test_psnr": result["test_psnr"],
        "test_ssim": result["test_ssim"],
        "test_bicubic_psnr": result["test_bicubic_psnr"],
        "test_bicubic_ssim": result["test_bicubic_ssim"],
        "set14_psnr": model["psnr"],
        "set14_ssim": model["ssim"],
        "set14_bicubic_psnr": bicubic["psnr"],
        "set14_bicubic_ssim": bicubic["ssim"],
    }


def worst_drop(values: list[float], after: int) -> float:
    """The largest fall of a validation PSNR below the best before it, over the epochs past
    the first `after` (0.0: it never fell)."""
    drops = [max(values[:i]) - v for i, v in enumerate(values) if i >= after and i > 0]
    return round(max([0.0, *drops]), 3)


SCORES = ("val_psnr", "test_psnr", "test_ssim", "set14_psnr", "set14_ssim")


def summary(name: str, per_seed: dict[int, dict]) -> dict:
    """A row over its seeds: each score's mean and (sample) standard deviation, its gain over
    bicubic (the same for every seed: the evaluation LR is seeded per image, not per run)."""
    runs = list(per_seed.values())
    out = {"changes": ROWS[name][0], "sets": ROWS[name][1], "seeds": per_seed}
    out["steps"] = round(statistics.mean(r["steps"] for r in runs))
    out["worst_drop_after_epoch_2"] = max(r["worst_drop_after_epoch_2"] for r in runs)
    for key in SCORES:
        values = [r[key] for r in runs]
        bicubic = runs[0][key.replace("_psnr", "_bicubic_psnr").replace("_ssim", "_bicubic_ssim")]
        std = statistics.stdev(values) if len(values) > 1 else None
        out[key] = {"mean": statistics.mean(values), "std": std, "bicubic": bicubic}
    return out


def table(rows: dict) -> str:
    """Markdown: PSNR mean (+- std over seeds), (gain over bicubic), [difference to recipe]."""
    ref = rows.get("recipe")

    def cell(name: str, key: str) -> str:
        r = rows[name][key]
        text = f"{r['mean']:.2f}" + (f" ± {r['std']:.2f}" if r["std"] is not None else "")
        text += f" ({r['mean'] - r['bicubic']:+.2f})"
        if ref is not None and name != "recipe":
            text += f" [{r['mean'] - ref[key]['mean']:+.2f}]"
        return text

    lines = [
        "| row | changes | seeds | steps | val PSNR (vs bicubic) [vs recipe] "
        "| test split | Set14 | worst val drop after epoch 2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in rows.items():
        cells = [name, r["changes"], str(len(r["seeds"])), f"{r['steps']:,}"]
        cells += [cell(name, "val_psnr"), cell(name, "test_psnr"), cell(name, "set14_psnr")]
        cells.append(f"{r['worst_drop_after_epoch_2']:.2f} dB")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    shards = work / "shards"
    budget = f"{args.minutes:g}min" if args.minutes else f"{args.steps}steps"
    tag = f"{Path(args.job).stem}-{budget}" + ("-quick" if args.quick else "")
    digest = config_digest(args.job, args.sets)
    runs, reports = work / "runs" / f"{tag}-{digest}", work / "reports" / f"{tag}-{digest}"
    t0 = time.perf_counter()
    build_shards(Path(args.datasets), shards, build_options(args.job))
    with_bn = bool(load_config(REPO / args.job, args.sets).model.batch_norm)
    names = args.only or [n for n in ROWS if with_bn or n not in BATCH_NORM_ROWS]
    rows = {
        n: summary(
            n, {seed: train_and_score(n, seed, args, shards, runs, reports) for seed in args.seeds}
        )
        for n in names
    }
    path = Path(args.out) if args.out else RESULTS / f"ablation-{tag}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old and old.get("config_digest") != digest:
        first, path = path, path.with_name(f"{path.stem}-{digest}.json")
        print(f"{first.name} holds rows of another recipe; these go to {path.name}")
        old = json.loads(path.read_text()) if path.is_file() else {}
    argv = sys.argv[1:]  # --work's directory is this machine's, not part of the recipe
    argv = [("W" if i and argv[i - 1] == "--work" else a) for i, a in enumerate(argv)]
    command = " ".join(["python bench/ablation.py", *argv])
    rows = {**old.get("rows", {}), **rows}
    out = {
        "what": f"ablation of {args.job}, each run trained for {budget}",
        "commands": [c for c in old.get("commands", []) if c != command] + [command],
        "protocol": "seed: RGB on [0, 1], the run's degradation with a fixed seed per image; "
        "test split = 256 center crops of the build's held-out photos, Set14 = whole images; "
        "each run's checkpoint chosen on validation only",
        "machine": {**machine(), "loadavg_at_end": os.getloadavg()},
        "job": args.job,
        "sets": args.sets,
        "config_digest": digest,
        "budget": {"minutes": args.minutes} if args.minutes else {"steps": args.steps},
        "wall_seconds_last_command": round(time.perf_counter() - t0, 1),
        "rows": rows,
        "table_md": table(rows),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(out["table_md"])
    print(f"results: {path}; run outputs under {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
