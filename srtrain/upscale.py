"""Upscale whole photos with a trained checkpoint.

    python -m srtrain.upscale --checkpoint CKPT INPUT... --out DIR [--tile N] [--overlap M] \\
        [--self-ensemble]

INPUT: JPEG/PNG/BMP files or folders of them; each becomes DIR/<name>.png at `scale` x the size
(the scale is read from the checkpoint's config.yaml; 2 without one). Grayscale and RGBA inputs
give RGB output. Images of any size: the LR is padded (mirrored) to a multiple of 4, which the
U-Net's two 2x downsamplings need, and the output is cropped back. Large images are processed in
N x N LR tiles (N a multiple of 4) overlapping by M pixels (rounded down to a multiple of 4, so
every tile starts on the pooling grid), each tile keeping only its part up to the middle of each
overlap, so memory stays bounded; with half an overlap at least the U-Net's reach (under 32 LR
pixels; the default overlap is 64) the output equals the untiled one to float rounding
(`--tile 0`: whole image at once). `--self-ensemble` writes the mean of the outputs for the 8
flips and rotations of the input, each turned back: 8x the compute, for 0.08 to 0.13 dB more
PSNR with the Base quality job's model (bench/README.md; `srtrain.evaluate --self-ensemble`
measures it for any checkpoint). An unreadable file is reported and skipped; the exit code is 1
if any file failed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

PROG = "python -m srtrain.upscale"
MODEL_MULTIPLE = 4  # the U-Net halves the LR twice (models.build_unet)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")


class ImageError(ValueError):
    """A file that cannot be read as an image."""


def read_image(path: str | Path, data: bytes | None = None) -> tuple[np.ndarray, bool]:
    """(H, W, 3) float32 RGB in [0, 1] and whether the image is grayscale, from a file (or its
    encoded bytes `data`, `path` naming it). Applies the EXIF orientation; 16-bit PNGs are scaled
    to [0, 1]; alpha is dropped."""
    import io

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as raw:
            raw.load()
            im = ImageOps.exif_transpose(raw)
            gray = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                arr = np.asarray(im, np.float32)
                arr = arr / (65535.0 if arr.max() > 255 else 255.0)
                return np.repeat(np.clip(arr, 0, 1)[..., None], 3, axis=-1), True
            arr = np.asarray(im.convert("RGB"), np.float32) / 255.0
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: cannot read image (not a JPEG, PNG or BMP image)") from None
    except (OSError, ValueError, SyntaxError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ImageError(f"{path}: cannot read image ({reason})") from None
    return arr, gray


def write_png(path: str | Path, img: np.ndarray) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def pad_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Mirrors the bottom/right edges so H and W become multiples of `multiple`."""
    h, w = img.shape[:2]
    ph, pw = -h % multiple, -w % multiple
    return np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="symmetric") if ph or pw else img


def _run(model, lr: np.ndarray, scale: int) -> np.ndarray:
    """The model on one (h, w, 3) LR image of any size -> (scale*h, scale*w, 3)."""
    h, w = lr.shape[:2]
    x = pad_to_multiple(lr, MODEL_MULTIPLE)[None].astype(np.float32)
    out = np.asarray(model(x, training=False), np.float32)[0]
    return out[: h * scale, : w * scale]


def _spans(size: int, tile: int, step: int) -> list[tuple[int, int]]:
    """(start, end) of the tiles along one axis. Starts are multiples of MODEL_MULTIPLE, as in
    the untiled pass: the U-Net pools 2x2 twice, and a tile starting elsewhere would see another
    pooling grid and give different pixels. The last tile ends at the edge, up to 3 pixels longer
    than `tile`."""
    if size <= tile:
        return [(0, size)]
    last = (size - tile) // MODEL_MULTIPLE * MODEL_MULTIPLE
    starts = [*range(0, last, step), last]
    return [(a, min(a + tile, size)) for a in starts[:-1]] + [(last, size)]


def _seams(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The part of each span whose output is kept: neighbours meet in the middle of their
    overlap, so every kept pixel is at least half an overlap from a tile edge inside the image."""
    cuts = [(spans[i][1] + spans[i + 1][0]) // 2 for i in range(len(spans) - 1)]
    return list(zip([spans[0][0], *cuts], [*cuts, spans[-1][1]], strict=True))


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """The k-th of the 8 flips and rotations of an (H, W, ...) image (0: itself)."""
    return np.rot90(img[:, ::-1] if k >= 4 else img, k % 4)


def undo_dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """The inverse of dihedral(., k)."""
    out = np.rot90(img, -(k % 4))
    return out[:, ::-1] if k >= 4 else out


def predict(
    model,
    lr: np.ndarray,
    scale: int,
    tile: int = 0,
    overlap: int = 64,
    ensemble: bool = False,
    single: np.ndarray | None = None,
) -> np.ndarray:
    """(h, w, 3) LR in [0, 1] -> (scale*h, scale*w, 3) output, in tiles of tile x tile LR pixels
    overlapping by `overlap` (tile 0: the whole image in one pass). `ensemble`: the mean of the
    outputs for the 8 flips and rotations of the input, each turned back (geometric
    self-ensemble; 8x the compute); `single`, the plain pass's output if the caller has it
    already, stands in for the first of the 8."""
    if ensemble:  # a running sum: one output in memory besides the total, as tiling intends
        total = np.zeros((lr.shape[0] * scale, lr.shape[1] * scale, 3), np.float32)
        for k in range(8):
            if k == 0 and single is not None:
                total += single
                continue
            total += undo_dihedral(predict(model, dihedral(lr, k), scale, tile, overlap), k)
        return total / 8
    h, w = lr.shape[:2]
    if tile <= 0:
        return _run(model, lr, scale)
    # Overlaps in whole pooling cells keep every tile start on the untiled pass's grid.
    overlap = min(overlap, tile // 2) // MODEL_MULTIPLE * MODEL_MULTIPLE
    step = tile - overlap
    out = np.zeros((h * scale, w * scale, 3), np.float32)
    ys, xs = _spans(h, tile, step), _spans(w, tile, step)
    for (y0, y1), (ky0, ky1) in zip(ys, _seams(ys), strict=True):
        for (x0, x1), (kx0, kx1) in zip(xs, _seams(xs), strict=True):
            sr = _run(model, lr[y0:y1, x0:x1], scale)  # (s*(y1-y0), s*(x1-x0), 3)
            # A tile's edge pixels miss the context beyond it: only its middle is kept.
            out[ky0 * scale : ky1 * scale, kx0 * scale : kx1 * scale] = sr[
                (ky0 - y0) * scale : (ky1 - y0) * scale, (kx0 - x0) * scale : (kx1 - x0) * scale
            ]
    return out


def checkpoint_scale(checkpoint: str) -> int:
    """degradation.scale from the checkpoint's config.yaml (2 when absent)."""
    import yaml

    from srtrain import storage

    uri = checkpoint[: -len("/model.keras")] if checkpoint.endswith("/model.keras") else checkpoint
    try:
        data = yaml.safe_load(storage.read_bytes(storage.join(uri, "config.yaml")))
        return int(data["degradation"]["scale"])
    except (storage.StorageError, OSError, KeyError, TypeError, ValueError):
        return 2


def load(checkpoint: str):
    """The checkpoint's model, or one-line errors as ValueError."""
    from srtrain import checkpoints, storage

    try:
        return checkpoints.load_model(checkpoint)
    except (FileNotFoundError, storage.StorageError) as e:
        raise ValueError(str(e)) from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{checkpoint}: cannot load the model ({reason[:200]})") from None


def list_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image files named or inside the named folders (sorted), and errors for missing inputs."""
    files, errors = [], []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTS)
            if not found:
                errors.append(f"{p}: no JPEG/PNG/BMP images in this folder")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def _out_name(path: Path, used: set[str]) -> str:
    name, i = f"{path.stem}.png", 1
    while name in used:  # same stem from two folders, or a.jpg beside a.png
        name, i = f"{path.stem}_{i}.png", i + 1
    used.add(name)
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint directory (local or s3://)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--out", required=True, help="output folder for the PNGs")
    p.add_argument(
        "--tile",
        type=int,
        default=512,
        help="LR tile side in pixels, a multiple of 4 (0: no tiling; default 512)",
    )
    p.add_argument(
        "--overlap",
        type=int,
        default=64,
        help="tile overlap in LR pixels, rounded down to a multiple of 4 (default 64)",
    )
    p.add_argument(
        "--self-ensemble",
        action="store_true",
        help="average the outputs for the 8 flips and rotations of the input (8x the compute)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if (
        args.tile < 0
        or args.tile % MODEL_MULTIPLE
        or args.overlap < 0
        or (args.tile and args.overlap >= args.tile)
    ):
        p.error("--tile must be 0 or a positive multiple of 4, --overlap in [0, tile)")

    files, errors = list_inputs(args.inputs)
    for e in errors:
        print(f"{PROG}: error: {e}", file=sys.stderr)
    try:
        model = load(args.checkpoint)
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    scale = checkpoint_scale(args.checkpoint)
    from tqdm import tqdm

    failed, used = len(errors), set()
    for path in tqdm(files, desc="upscaling", unit="image", disable=args.no_progress):
        try:
            lr, _ = read_image(path)
        except ImageError as e:
            tqdm.write(f"{PROG}: error: {e} (skipped)", file=sys.stderr)
            failed += 1
            continue
        sr = predict(model, lr, scale, args.tile, args.overlap, ensemble=args.self_ensemble)
        write_png(Path(args.out) / _out_name(path, used), sr)
    done = len(files) - (failed - len(errors))
    print(f"{done} image(s) written to {args.out}" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
