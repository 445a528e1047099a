"""Evaluate checkpoints against bicubic upscaling and the degraded input, on whole images.

    python -m srtrain.evaluate --checkpoint CKPT [CKPT ...] --data SRC --protocol seed|standard \\
        --out DIR [--crop N] [--limit N] [--self-ensemble]

SRC: `samples` (the bundled photos' test split; `samples:val` or `samples:train` for another), a
folder of JPEG/PNG/BMP images, or a shard dataset with a split, `s3://bucket/iaprtc12:test` or
`./shards:val` (no split: test).

Protocols (srtrain.metrics.PROTOCOLS):
- `seed`: the original project's. LR = the checkpoint's degradation (area down, blur, noise) with
  a fixed seed per image id; RGB PSNR/SSIM on [0, 1]. `--crop 256` gives its 256 center crops.
- `standard`: the SR literature's. LR = bicubic downscaling (antialiased, 8-bit), Y-channel
  PSNR/SSIM with `scale` border pixels cropped, as the published Set5/Set14 tables.

Every HR is cropped to a multiple of the scale; the model runs on LR of any size (mirror-padded
to a multiple of 4 and cropped back). Writes DIR/report.json, DIR/report.md (one row per model,
then bicubic and the degraded input upscaled by nearest neighbour) and DIR/per_image.csv.
`--self-ensemble` adds a row per model for its geometric self-ensemble: the mean of its outputs
for the 8 flips and rotations of the input, each turned back (8x the compute of a pass).
A bad checkpoint stops with one line and exit 1; unreadable images are reported, skipped, and
make the exit code 1 while the report is still written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from srtrain.scoring import BICUBIC, INPUT
from srtrain.upscale import IMAGE_EXTS, ImageError, predict, read_image

PROG = "python -m srtrain.evaluate"


class EvalError(ValueError):
    """A problem with the command's arguments a user can fix (one line)."""


@dataclass
class Source:
    kind: str  # "samples" | "folder" | "shards"
    location: str
    split: str = ""

    def describe(self) -> str:
        return f"{self.location}:{self.split}" if self.split else self.location


def parse_source(src: str) -> Source:
    """`samples[:split]`, an image folder, or a shard dataset `URI[:split]`."""
    m = re.fullmatch(r"(.+):([A-Za-z][\w-]*)", src)
    base, split = (m.group(1), m.group(2)) if m and not src.endswith(":") else (src, "")
    if base == "samples":
        return Source("samples", "samples", split or "test")
    from srtrain import storage

    if storage.is_s3(base):
        return Source("shards", base, split or "test")
    p = Path(base)
    if (p / "manifest.json").is_file():
        return Source("shards", base, split or "test")
    if p.is_dir():
        if split:
            raise EvalError(
                f"--data {src}: {base} is an image folder (no manifest.json); "
                "splits apply to shard datasets"
            )
        return Source("folder", base)
    raise EvalError(f"--data {src}: not 'samples', an image folder, or a shard dataset")


def iter_records(
    source: Source, endpoint_url: str = "", region: str = ""
) -> tuple[int | None, Iterator[tuple[str, bytes | None, str]]]:
    """(count if known, iterator of (image id, encoded bytes or None, where it came from))."""
    if source.kind == "samples":
        from srtrain.data import samples

        try:
            items = samples.read(source.split)
        except ValueError as e:
            raise EvalError(f"--data: {e}") from None
        return len(items), ((i, b, i) for i, b in items)
    if source.kind == "folder":
        files = sorted(
            f
            for f in Path(source.location).iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS
        )
        if not files:
            raise EvalError(f"--data {source.location}: no JPEG/PNG/BMP images in this folder")

        def read_files():
            for f in files:
                try:
                    yield f.stem, f.read_bytes(), str(f)
                except OSError as e:
                    yield f.stem, None, f"{f}: cannot read ({e.strerror})"

        return len(files), read_files()
    from srtrain.config import from_dict
    from srtrain.data import shards

    cfg = from_dict(
        {"data": {"source": source.location, "endpoint_url": endpoint_url, "region": region}}
    )
    manifest = shards.load_manifest(source.location, endpoint_url, region)
    count = (manifest.get("splits", {}).get(source.split) or {}).get("images")
    ds = shards.records(cfg, source.split)

    def rows():
        for r in ds.as_numpy_iterator():
            key = r["id"].decode()
            yield key, r["image"], f"{source.location}:{source.split}/{key}"

    return count if isinstance(count, int) else None, rows()


# --- checkpoints --------------------------------------------------------------------------------


@dataclass
class Entry:
    name: str
    checkpoint: str
    model: object
    config: object  # srtrain.config.Config or None


def describe_config(cfg) -> str:
    """'advanced U-Net, MAE + 0.005 x VGG block5_conv4' or 'base U-Net, MAE, MSE for the last
    25%' for a Config."""
    loss = "MAE"
    if cfg.loss.kind == "composite":
        layers = " + ".join(
            n if w == 1 else f"{w:g} {n}" for n, w in cfg.loss.perceptual_layers.items()
        )
        loss = f"MAE + {cfg.loss.alpha:g} x VGG {layers}"
    if cfg.loss.mse_final_fraction:
        loss += f", MSE for the last {cfg.loss.mse_final_fraction:.0%}"
    return f"{cfg.model.arch} U-Net, {loss}"


def run_name(checkpoint: str) -> str:
    """The run directory's name for .../RUN/checkpoints/checkpoint_N (else the last part)."""
    parts = [p for p in checkpoint.rstrip("/").split("/") if p and p != "model.keras"]
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return parts[-3]
    if len(parts) >= 2 and parts[-2].startswith("checkpoint"):
        return parts[-3] if len(parts) >= 3 else parts[-1]
    return parts[-1] if parts else checkpoint


def load_checkpoint(checkpoint: str) -> Entry:
    from srtrain import config, storage
    from srtrain.upscale import load

    model = load(checkpoint)  # ValueError with one line
    base = checkpoint[: -len("/model.keras")] if checkpoint.endswith("/model.keras") else checkpoint
    cfg = None
    try:
        import yaml

        cfg = config.from_dict(
            yaml.safe_load(storage.read_bytes(storage.join(base, "config.yaml")))
        )
    except (storage.StorageError, OSError, config.ConfigError, ValueError, TypeError):
        pass
    name = run_name(checkpoint)
    if cfg is not None:
        name = f"{name} ({describe_config(cfg)})"
    return Entry(name, checkpoint, model, cfg)


# --- evaluation ---------------------------------------------------------------------------------


def make_lr(hr: np.ndarray, image_id: str, protocol: str, degradation) -> np.ndarray:
    """The LR input for an HR (H, W, 3) in [0, 1] whose sides are multiples of the scale."""
    from srtrain import metrics

    if protocol == "standard":
        return metrics.bicubic_downscale(hr, degradation.scale)
    import tensorflow as tf

    from srtrain import degrade

    seed = degrade.eval_seed(degradation, tf.constant(image_id))
    return degrade.degrade(tf.constant(hr), degradation, seed).numpy()


def center_crop(img: np.ndarray, size: int) -> np.ndarray | None:
    h, w = img.shape[:2]
    if h < size or w < size:
        return None
    top, left = (h - size) // 2, (w - size) // 2
    return img[top : top + size, left : left + size]


def ensemble_name(name: str) -> str:
    return f"{name}, x8 self-ensemble"


def evaluate_image(
    entries: list[Entry],
    hr: np.ndarray,
    *,
    image_id: str,
    protocol: str,
    degradation,
    tile: int = 0,
    ensemble: bool = False,
) -> dict[str, tuple[float, float]]:
    """{method: (psnr, ssim)} for one HR image: every model (and with `ensemble` its geometric
    self-ensemble too), bicubic and the nearest input (srtrain.scoring on a batch of one)."""
    from srtrain import scoring

    scale = degradation.scale
    lr = make_lr(hr, image_id, protocol, degradation)
    sr = {e.name: predict(e.model, lr, scale, tile) for e in entries}
    if ensemble:  # the plain pass above is the first of the 8
        for e in entries:
            sr[ensemble_name(e.name)] = predict(
                e.model, lr, scale, tile, ensemble=True, single=sr[e.name]
            )
    models = {name: lambda _, y=y: y[None] for name, y in sr.items()}
    outputs = scoring.upscale(models, lr[None], scale, nearest=True)
    scores = scoring.score(outputs, hr[None], protocol=protocol, scale=scale)
    return {k: (float(v["psnr"][0]), float(v["ssim"][0])) for k, v in scores.items()}


def run(
    entries: list[Entry],
    source: Source,
    protocol: str,
    out: Path,
    *,
    crop: int = 0,
    limit: int = 0,
    ensemble: bool = False,
    endpoint_url: str = "",
    region: str = "",
    progress: bool = True,
    log=print,
) -> dict:
    """Evaluates and writes report.json, report.md, per_image.csv; returns the report."""
    from tqdm import tqdm

    from srtrain import metrics
    from srtrain.config import DegradationConfig

    cfgs = [e.config for e in entries if e.config is not None]
    degradation = cfgs[0].degradation if cfgs else DegradationConfig()
    if any(c.degradation != degradation for c in cfgs):
        log(
            f"{PROG}: warning: the checkpoints were trained with different degradations; "
            f"using the first one's ({entries[0].name})"
        )
    scale = degradation.scale
    total, records = iter_records(source, endpoint_url, region)
    if limit:
        total = min(total, limit) if total else limit
    per_image, skipped, too_small = [], [], []
    bar = tqdm(total=total, desc=f"evaluating ({protocol})", unit="image", disable=not progress)
    for n, (image_id, data, where) in enumerate(records):
        if limit and n >= limit:
            break
        bar.update(1)
        if data is None:
            skipped.append(where)
            tqdm.write(f"{PROG}: error: {where} (skipped)", file=sys.stderr)
            continue
        try:
            hr, _ = read_image(where, data)
        except ImageError as e:
            skipped.append(str(e))
            tqdm.write(f"{PROG}: error: {e} (skipped)", file=sys.stderr)
            continue
        hr = center_crop(hr, crop) if crop else hr
        if hr is None:
            too_small.append(where)
            continue
        hr = metrics.modcrop(hr, scale)
        for method, (p, s) in evaluate_image(
            entries,
            hr,
            image_id=image_id,
            protocol=protocol,
            degradation=degradation,
            ensemble=ensemble,
        ).items():
            per_image.append({"image": image_id, "method": method, "psnr": p, "ssim": s})
    bar.close()

    methods = [(e.name, e.checkpoint) for e in entries]
    if ensemble:
        methods += [(ensemble_name(e.name), e.checkpoint) for e in entries]
    methods += [(BICUBIC, None), (INPUT, None)]
    rows = []
    for m, checkpoint in methods:
        vals = [r for r in per_image if r["method"] == m]
        finite = [r["psnr"] for r in vals if np.isfinite(r["psnr"])]
        rows.append(
            {
                "method": m,
                "checkpoint": checkpoint,
                "psnr": float(np.mean(finite)) if finite else None,
                "ssim": float(np.mean([r["ssim"] for r in vals])) if vals else None,
                "images": len(vals),
            }
        )
    report = {
        "protocol": protocol,
        "protocol_description": metrics.PROTOCOLS[protocol],
        "data": source.describe(),
        "scale": scale,
        "crop": crop or None,
        "self_ensemble": ensemble,
        "degradation": vars(degradation) if protocol == "seed" else "bicubic x1/scale, 8-bit",
        "images": len({r["image"] for r in per_image}),
        "skipped": skipped,
        "smaller_than_crop": too_small,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["image", "method", "psnr", "ssim"])
    w.writeheader()
    for r in per_image:
        w.writerow({**r, "psnr": f"{r['psnr']:.4f}", "ssim": f"{r['ssim']:.5f}"})
    (out / "per_image.csv").write_text(buf.getvalue())
    return report


def markdown(report: dict) -> str:
    crop = f", {report['crop']}x{report['crop']} center crops" if report["crop"] else ""
    lines = [
        f"# Evaluation on {report['data']} (x{report['scale']}, {report['images']} images{crop})",
        "",
        f"Protocol `{report['protocol']}`: {report['protocol_description']}.",
        "",
        "| method | PSNR (dB) | SSIM |",
        "| --- | --- | --- |",
    ]
    for r in report["rows"]:
        p = "n/a" if r["psnr"] is None else f"{r['psnr']:.2f}"
        s = "n/a" if r["ssim"] is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['method']} | {p} | {s} |")
    if report["skipped"]:
        lines += ["", f"Skipped {len(report['skipped'])} image(s):", ""]
        lines += [f"- {s}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument(
        "--checkpoint",
        nargs="+",
        required=True,
        metavar="CKPT",
        help="checkpoint directories (local or s3://); several give one table",
    )
    p.add_argument("--data", required=True, help="samples[:split], an image folder, or URI:split")
    p.add_argument("--protocol", choices=("seed", "standard"), default="standard")
    p.add_argument("--out", required=True, help="output folder for the reports")
    p.add_argument("--crop", type=int, default=0, help="HR center crop side (0: whole images)")
    p.add_argument("--limit", type=int, default=0, help="evaluate at most N images (0: all)")
    p.add_argument(
        "--self-ensemble",
        action="store_true",
        help="also score each model's geometric self-ensemble (the mean over the 8 flips and "
        "rotations of the input, 8x the compute), as a row of its own",
    )
    p.add_argument("--endpoint-url", default="", help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--region", default="")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    from srtrain.storage import StorageError

    try:
        source = parse_source(args.data)
        entries = [load_checkpoint(c) for c in args.checkpoint]
        names = [e.name for e in entries]
        for i, e in enumerate(entries):  # two checkpoints of one run: tell them apart
            if names.count(e.name) > 1:
                e.name = f"{e.name} [{i + 1}]"
        report = run(
            entries,
            source,
            args.protocol,
            Path(args.out),
            crop=args.crop,
            limit=args.limit,
            ensemble=args.self_ensemble,
            endpoint_url=args.endpoint_url,
            region=args.region,
            progress=not args.no_progress,
        )
    except (EvalError, ValueError, StorageError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    print(markdown(report))
    print(f"reports in {args.out}")
    if report["skipped"]:
        print(f"{PROG}: {len(report['skipped'])} image(s) skipped", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
