"""The comparison table of several training runs, as the original project reported it.

    python -m srtrain.compare RUN_DIR [RUN_DIR ...] --out DIR [--split test] [--images N]

Each RUN_DIR (local or s3://) holds config.yaml and result.json (its "checkpoint" is the best
checkpoint). Every run's best model is evaluated on the same test patches: the first run's data
source and its test split (`data.test_split`, default `test`: the bundled samples and shard
datasets built with the default split have one; else its validation split), HR center crops of
`data.val_patch_size`, LR by the run's degradation with a fixed seed per image (protocol `seed`).
The scores come from srtrain.scoring, as training's validation and test split compute them (the
loss there is MAE); this module lays them out. Writes DIR/compare.md and DIR/compare.csv (test
MAE, PSNR, SSIM per run, and a bicubic row) and DIR/compare.png (srtrain.figures): one test patch
as LR, bicubic, every model and HR side by side.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import sys
from pathlib import Path

PROG = "python -m srtrain.compare"


class CompareError(ValueError):
    """A run directory or argument a user can fix (one line)."""


@dataclasses.dataclass
class Run:
    name: str
    run_dir: str
    config: object  # srtrain.config.Config
    result: dict
    model: object = None


def load_run(run_dir: str) -> Run:
    import yaml

    from srtrain import config, storage
    from srtrain.upscale import load

    try:
        cfg = config.from_dict(
            yaml.safe_load(storage.read_bytes(storage.join(run_dir, "config.yaml")))
        )
        result = json.loads(storage.read_bytes(storage.join(run_dir, "result.json")))
    except storage.StorageError as e:
        raise CompareError(f"{run_dir}: not a finished run directory ({e})") from None
    except (config.ConfigError, ValueError, yaml.YAMLError) as e:
        raise CompareError(f"{run_dir}: unreadable config.yaml or result.json ({e})") from None
    if not result.get("checkpoint"):
        raise CompareError(f"{run_dir}: result.json names no checkpoint")
    name = Path(run_dir.rstrip("/")).name
    return Run(name, run_dir, cfg, result, load(result["checkpoint"]))


def test_split(cfg, split: str = "") -> str:
    """The split to compare on: `split` if given, else the run's test split (`data.test_split`)
    where the dataset has it (the bundled samples do), else its validation split."""
    if split:
        return split
    if cfg.data.source == "samples":
        from srtrain.data import samples

        return cfg.data.test_split if cfg.data.test_split in samples.SPLITS else cfg.data.val_split
    from srtrain.data import shards

    manifest = shards.load_manifest(cfg.data.source, cfg.data.endpoint_url, cfg.data.region)
    has_test = cfg.data.test_split in manifest.get("splits", {})
    return cfg.data.test_split if has_test else cfg.data.val_split


def evaluate(
    runs: list[Run], split: str, images: int = 0, batch_size: int = 8, progress: bool = True
) -> tuple[dict[str, dict], dict]:
    """Mean test MAE/PSNR/SSIM per run name and for "bicubic", and the first patch's images
    (srtrain.scoring, as training's validation: the runs' loss there is MAE)."""
    from tqdm import tqdm

    from srtrain import data, losses, scoring

    cfg = runs[0].config
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_images=images))
    ds = data.eval_dataset(cfg, split=split, batch_size=batch_size)
    models = {r.name: lambda x, m=r.model: m(x, training=False) for r in runs}
    totals, first = scoring.Totals(), {}
    for _, lr, hr in tqdm(ds, desc=f"comparing on {split}", unit="batch", disable=not progress):
        outs = scoring.upscale(models, lr, cfg.degradation.scale)
        totals.add(scoring.score(outs, hr, loss_fn=losses.mae), int(lr.shape[0]))
        if not first:
            first = {"LR": lr[0].numpy(), "HR": hr[0].numpy()}
            first.update({n: outs[n][0].numpy() for n in outs})
    if not totals.images:
        raise CompareError(
            f"{cfg.data.source}:{split}: no test images big enough for the "
            f"{cfg.data.val_patch_size or cfg.data.patch_size}-pixel crops"
        )
    table = {
        n: {"mae": m["loss"], "psnr": m["psnr"], "ssim": m["ssim"], "images": totals.images}
        for n, m in totals.means().items()
    }
    return table, first


def describe(run: Run) -> str:
    from srtrain.evaluate import describe_config

    return describe_config(run.config)


def write_table(runs: list[Run], table: dict, out: Path, source: str, split: str) -> str:
    header = ["run", "model", "params", "test MAE", "PSNR (dB)", "SSIM", "best epoch"]
    rows = []
    for r in runs:
        t = table[r.name]
        rows.append(
            [
                r.name,
                describe(r),
                f"{r.model.count_params():,}",
                f"{t['mae']:.4f}",
                f"{t['psnr']:.2f}",
                f"{t['ssim']:.3f}",
                str(r.result.get("best_epoch", "")),
            ]
        )
    b = table["bicubic"]
    rows.append(
        [
            "bicubic",
            "bicubic interpolation",
            "0",
            f"{b['mae']:.4f}",
            f"{b['psnr']:.2f}",
            f"{b['ssim']:.3f}",
            "",
        ]
    )
    n = b["images"]
    md = [
        f"# Comparison on {source}:{split} ({n} test patches, protocol `seed`: RGB, [0, 1], "
        "center crops, the run's degradation with a fixed seed)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    md += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(md) + "\n"
    (out / "compare.md").write_text(text)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "model", "params", "test_mae", "psnr", "ssim", "best_epoch"])
    for r in runs:
        t = table[r.name]
        w.writerow(
            [
                r.name,
                describe(r),
                r.model.count_params(),
                f"{t['mae']:.6f}",
                f"{t['psnr']:.4f}",
                f"{t['ssim']:.5f}",
                r.result.get("best_epoch", ""),
            ]
        )
    w.writerow(
        [
            "bicubic",
            "bicubic interpolation",
            0,
            f"{b['mae']:.6f}",
            f"{b['psnr']:.4f}",
            f"{b['ssim']:.5f}",
            "",
        ]
    )
    (out / "compare.csv").write_text(buf.getvalue())
    return text


def write_figure(runs: list[Run], first: dict, out: Path) -> Path:
    """LR | bicubic | each model | HR for one test patch, PSNR in the titles."""
    from srtrain import figures

    hr = first["HR"]
    panels = [("LR input", first["LR"], None), ("bicubic", first["bicubic"], hr)]
    panels += [(f"{r.name}\n{describe(r)}", first[r.name], hr) for r in runs]
    panels.append(("HR", hr, None))
    return figures.side_by_side(panels, out / "compare.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--split", default="", help="split to compare on (default: the runs' test split, else val)"
    )
    p.add_argument("--images", type=int, default=0, help="at most N test images (0: all)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from srtrain.config import ConfigError
    from srtrain.storage import StorageError

    try:
        runs = [load_run(d) for d in args.runs]
        names = [r.name for r in runs]
        for i, r in enumerate(runs):
            if names.count(r.name) > 1:
                r.name = f"{r.name} [{i + 1}]"
        sources = {r.config.data.source for r in runs}
        if len(sources) > 1:
            print(
                f"{PROG}: warning: runs trained on different data ({', '.join(sorted(sources))}); "
                f"comparing on {runs[0].config.data.source}",
                file=sys.stderr,
            )
        split = test_split(runs[0].config, args.split)
        table, first = evaluate(runs, split, args.images, progress=not args.no_progress)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = write_table(runs, table, out, runs[0].config.data.source, split)
        fig = write_figure(runs, first, out)
    except (CompareError, ConfigError, StorageError, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(text)
    print(f"table: {out / 'compare.md'}, {out / 'compare.csv'}; figure: {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
