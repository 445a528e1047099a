"""Building a shard dataset from photos: check every image, write Parquet shards, then the manifest.

    python -m srtrain.data build SRC DEST   # SRC: IAPR TC-12 .tgz/.tar, a folder, or a glob

A shard row is one image: `id`, `path` (where it came from), `height`, `width`, `format` and
`image`, the encoded bytes exactly as read (no re-encoding). Images are checked by decoding them
fully with Pillow, in parallel processes; training never imports this module.

The split of an image is a hash of its id (and the build seed), so adding photos never moves
existing ones between splits. Bad files never abort a build: they are skipped, counted and listed
with the reason in the manifest.

`train_scales` (scale augmentation, off by default): every photo of the `train` split is also
stored downscaled by each factor (Lanczos, PNG), with the id `<id>@<factor>x`, while its
sides stay at least `min_size`. A copy always goes to the train split with its photo, so no
validation or test photo is ever seen in training at another scale.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import re
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from srtrain import storage
from srtrain.data.manifest import FORMAT, MANIFEST

log = logging.getLogger("srtrain.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")
DEFAULT_SPLIT = {"train": 0.68, "val": 0.17, "test": 0.15}
ROW_GROUP = 32  # images per Parquet row group: the unit a reader streams (a few MB)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("format", pa.string()),
        ("image", pa.binary()),
    ]
)


class BuildError(ValueError):
    """A build request that cannot start (bad arguments, unreadable source)."""


# --- splits and ids -----------------------------------------------------------------------------


def unit_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) from a string and a seed (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(image_id: str, fractions: dict[str, float], seed: int = 2077) -> str:
    """The split an image belongs to: depends on its id, the fractions and the seed only."""
    u, total = unit_hash(image_id, seed), 0.0
    for name, frac in fractions.items():
        total += frac
        if u < total:
            return name
    return next(reversed(fractions))  # rounding at the top end


def parse_split(text: str) -> dict[str, float]:
    """'train=0.68,val=0.17,test=0.15' -> fractions (normalised to sum to 1)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            frac = float(value)
        except ValueError:
            frac = -1.0
        if not sep or not re.fullmatch(r"[A-Za-z][\w-]*", name) or frac < 0:
            raise BuildError(
                f"--split {text!r}: expected name=fraction,..., e.g. train=0.68,val=0.17,test=0.15"
            )
        out[name] = frac
    total = sum(out.values())
    if total <= 0:
        raise BuildError(f"--split {text!r}: fractions must add up to more than 0")
    return {k: v / total for k, v in out.items()}


def parse_size(text: str) -> int:
    """'128MB' / '512KiB' / '1000000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(i?B?)\s*", str(text), re.I)
    if not m:
        raise BuildError(f"--shard-size {text!r}: expected a size like 128MB or 64MiB")
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]
    return max(1, int(float(m.group(1)) * unit))


def parse_scales(text: str) -> tuple[float, ...]:
    """'0.8,0.6' -> (0.8, 0.6); '' -> ()."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BuildError(f"--train-scales {text!r}: expected factors like 0.8,0.6") from None


def image_id(relpath: str) -> str:
    """'iaprtc12/images/17/17975.jpg' -> '17/17975': the path below images/, no extension."""
    rel = relpath.replace(os.sep, "/").lstrip("./")
    parts = rel.split("/")
    if "images" in parts[:-1]:
        parts = parts[len(parts) - 1 - parts[::-1].index("images") :]
        parts = parts[1:] if parts[0] == "images" else parts
    return posixpath.splitext("/".join(parts))[0]


# --- reading sources ----------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTS)


def is_archive(src: str) -> bool:
    return str(src).lower().endswith((".tgz", ".tar.gz", ".tar", ".tar.bz2", ".tar.xz"))


def list_files(src: str, seed: int) -> list[tuple[str, str]]:
    """(relative path, file path) of the images of a folder or glob, in a seeded shuffled order.

    The order spreads neighbouring photos over different shards (a shard is then a random sample),
    and is a function of the paths and seed only, so re-running gives the same shards.
    """
    if any(c in src for c in "*?["):
        prefix = re.split(r"[*?\[]", src, maxsplit=1)[0]
        root = Path(prefix) if prefix.endswith(("/", os.sep)) else Path(prefix).parent
        files = [Path(p) for p in glob.glob(src, recursive=True)]
    else:
        root = Path(src)
        if not root.is_dir():
            raise BuildError(f"{src}: no such folder, archive or glob")
        files = [p for p in root.rglob("*")]
    items = [
        (p.relative_to(root).as_posix(), str(p)) for p in files if p.is_file() and _is_image(p.name)
    ]
    return sorted(items, key=lambda it: unit_hash(it[0], seed))


def iter_archive(src: str) -> Iterator[tuple[str, bytes | Exception]]:
    """(member name, bytes) of the images in a tar archive, streamed without extracting it."""
    try:
        tar = tarfile.open(src, mode="r|*")  # streaming mode: one pass, any compression
    except (OSError, tarfile.TarError) as e:
        raise BuildError(f"{src}: cannot open the archive ({e})") from None
    with tar:
        try:
            for member in tar:
                if not member.isfile() or not _is_image(member.name):
                    continue
                f = tar.extractfile(member)
                try:
                    yield member.name, f.read() if f else b""
                except (OSError, tarfile.TarError, EOFError) as e:
                    yield member.name, e
                    return  # a truncated archive ends here
        except (OSError, tarfile.TarError, EOFError) as e:
            log.warning("%s: archive ends early (%s); keeping what was read", src, e)


# --- checking one image ------------------------------------------------------------------------


@dataclass
class Checked:
    relpath: str
    id: str = ""
    data: bytes = b""
    height: int = 0
    width: int = 0
    format: str = ""
    reason: str = ""  # non-empty: skipped


def check_image(relpath: str, data: bytes | str | Exception, min_size: int) -> Checked:
    """Decodes an image fully (catching truncation) and says whether and why to skip it."""
    from PIL import Image, UnidentifiedImageError

    out = Checked(relpath, id=image_id(relpath))
    if isinstance(data, Exception):
        out.reason = f"unreadable ({data})"
        return out
    if isinstance(data, str):
        try:
            data = Path(data).read_bytes()
        except OSError as e:
            out.reason = f"unreadable ({e.strerror})"
            return out
    if not data:
        out.reason = "empty file (0 bytes)"
        return out
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").upper()
                if fmt not in ("JPEG", "PNG", "BMP"):
                    out.reason = f"unsupported format {fmt or 'unknown'} (JPEG, PNG or BMP)"
                    return out
                im.load()  # decodes every pixel: truncated and corrupt files fail here
                out.width, out.height = im.size
    except UnidentifiedImageError:
        out.reason = "not an image (unreadable header)"
        return out
    except (OSError, SyntaxError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else "decode error"
        out.reason = f"corrupt or truncated ({first})"
        return out
    except Image.DecompressionBombError:
        out.reason = "too large (decompression bomb guard)"
        return out
    if min(out.height, out.width) < min_size:
        out.reason = f"too small ({out.width}x{out.height}, min side < {min_size})"
        return out
    out.data, out.format = data, fmt.lower()
    return out


def scaled_copies(c: Checked, scales: tuple[float, ...], min_size: int) -> list[Checked]:
    """The downscaled copies of a checked image (Lanczos, PNG) whose sides stay >= min_size."""
    from PIL import Image

    out = []
    with Image.open(io.BytesIO(c.data)) as im:
        rgb = im.convert("RGB")
    for s in scales:
        w, h = round(c.width * s), round(c.height * s)
        if min(w, h) < min_size:
            continue
        buf = io.BytesIO()
        rgb.resize((w, h), Image.LANCZOS).save(buf, format="PNG")
        out.append(Checked(c.relpath, f"{c.id}@{s:g}x", buf.getvalue(), h, w, "png"))
    return out


def _check_task(args: tuple) -> tuple[Checked, list[Checked]]:
    """(the checked image, its scaled copies when it belongs to the train split)."""
    relpath, data, min_size, scales, split, seed = args
    c = check_image(relpath, data, min_size)
    if c.reason or not scales or split_of(c.id, split, seed) != "train":
        return c, []
    return c, scaled_copies(c, scales, min_size)


# --- building -----------------------------------------------------------------------------------


@dataclass
class _SplitWriter:
    dest: str
    split: str
    shard_size: int
    seed: int
    endpoint_url: str = ""
    region: str = ""
    rows: list[Checked] = field(default_factory=list)
    pending: int = 0
    shards: list[dict] = field(default_factory=list)

    def add(self, c: Checked) -> None:
        self.rows.append(c)
        self.pending += len(c.data)
        if self.pending >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        rows = sorted(self.rows, key=lambda c: unit_hash(c.id, self.seed))
        table = pa.table(
            {
                "id": [c.id for c in rows],
                "path": [c.relpath for c in rows],
                "height": pa.array([c.height for c in rows], pa.int32()),
                "width": pa.array([c.width for c in rows], pa.int32()),
                "format": [c.format for c in rows],
                "image": pa.array([c.data for c in rows], pa.binary()),
            },
            schema=SCHEMA,
        )
        buf = io.BytesIO()
        # Encoded photos do not compress: store them plain, streamable by row group.
        pq.write_table(
            table,
            buf,
            row_group_size=ROW_GROUP,
            compression="none",
            use_dictionary=["format"],
            write_statistics=False,
        )
        data = buf.getvalue()
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        storage.write_bytes(storage.join(self.dest, name), data, self.endpoint_url, self.region)
        self.shards.append(
            {
                "name": name,
                "images": len(rows),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self.rows, self.pending = [], 0


def build(
    src: str,
    dest: str,
    *,
    split: dict[str, float] | None = None,
    seed: int = 2077,
    shard_size: int = 128 * 2**20,
    min_size: int = 256,
    workers: int = 0,
    train_scales: tuple[float, ...] = (),
    endpoint_url: str = "",
    region: str = "",
    progress: bool = True,
) -> dict:
    """Builds a shard dataset from `src` into `dest`; returns the manifest (also written last)."""
    from tqdm import tqdm

    split = split or dict(DEFAULT_SPLIT)
    src = str(src)
    train_scales = tuple(train_scales)
    if train_scales and "train" not in split:
        raise BuildError("--train-scales: the copies go to the train split, and --split has none")
    if any(not 0 < s < 1 for s in train_scales):
        factors = ",".join(f"{s:g}" for s in train_scales)
        raise BuildError(f"--train-scales {factors}: factors must be between 0 and 1 (exclusive)")
    if storage.is_s3(dest):
        storage.check_writable(dest, endpoint_url, region)
    workers = workers or len(os.sched_getaffinity(0))
    writers = {s: _SplitWriter(dest, s, shard_size, seed, endpoint_url, region) for s in split}
    skipped: list[dict] = []
    copies = 0
    seen_ids: set[str] = set()
    if is_archive(src):
        if not Path(src).is_file():
            raise BuildError(f"{src}: no such archive")
        tasks: Iterator[tuple] = (
            (name, data, min_size, train_scales, split, seed) for name, data in iter_archive(src)
        )
        total = None
    else:
        files = list_files(src, seed)
        if not files:
            raise BuildError(f"{src}: no JPEG, PNG or BMP files found")
        tasks = ((rel, path, min_size, train_scales, split, seed) for rel, path in files)
        total = len(files)
    # fork where there is one: the checkers only run Pillow and start at once (spawn re-imports).
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    with tqdm(total=total, unit="img", desc="build", disable=not progress) as bar:
        # In blocks, so a streamed archive is never read far ahead of the checkers.
        while block := _take(tasks, 64 * workers):
            checked = (
                pool.imap(_check_task, block, chunksize=4) if pool else map(_check_task, block)
            )
            for c, scaled in checked:
                bar.update()
                if not c.reason and c.id in seen_ids:
                    c.reason = f"duplicate id {c.id!r} (same name, another extension)"
                if c.reason:
                    skipped.append({"path": c.relpath, "reason": c.reason})
                    continue
                seen_ids.add(c.id)
                writers[split_of(c.id, split, seed)].add(c)
                for copy in scaled:  # the photo's split: train
                    writers["train"].add(copy)
                copies += len(scaled)
    if pool:
        pool.close()
        pool.join()
    for w in writers.values():
        w.flush()
    manifest = {
        "format": FORMAT,
        "source": src,
        "seed": seed,
        "split": split,
        "min_size": min_size,
        "shard_size": shard_size,
        **({"train_scales": list(train_scales), "train_copies": copies} if train_scales else {}),
        "images": sum(sum(s["images"] for s in w.shards) for w in writers.values()),
        "splits": {
            name: {
                "images": sum(s["images"] for s in w.shards),
                "bytes": sum(s["bytes"] for s in w.shards),
                "shards": w.shards,
            }
            for name, w in writers.items()
        },
        "skipped": sorted(skipped, key=lambda s: s["path"]),
    }
    storage.write_bytes(
        storage.join(dest, MANIFEST),
        (json.dumps(manifest, indent=1) + "\n").encode(),
        endpoint_url,
        region,
    )
    return manifest


def _take(it: Iterator, n: int) -> list:
    out = []
    for x in it:
        out.append(x)
        if len(out) >= n:
            break
    return out
