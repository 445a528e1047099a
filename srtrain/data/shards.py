"""Shard datasets: build them from photos, describe them in a manifest, stream them into tf.data.

A dataset is a directory or `s3://bucket/prefix` holding Parquet shards (`<split>-NNNNN.parquet`)
and a `manifest.json` written last. A shard row is one image: `id`, `path` (where it came from),
`height`, `width`, `format` and `image`, the encoded bytes exactly as read (no re-encoding).

    python -m srtrain.data build SRC DEST   # SRC: IAPR TC-12 .tgz/.tar, a folder, or a glob
    python -m srtrain.data inspect DEST
    python -m srtrain.data verify DEST

Why Parquet: pyarrow reads it from local disk and S3 alike, streaming one row group at a time, with
no TensorFlow filesystem plugin (tensorflow-io's S3 is dead); the small columns (ids, sizes) read
without touching the image bytes; and the format is self-describing for any other tool.

The split of an image is a hash of its id (and the build seed), so adding photos never moves
existing ones between splits. Bad files never abort a build: they are skipped, counted and listed
with the reason in the manifest.
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
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from srtrain import storage
from srtrain.storage import StorageError

log = logging.getLogger("srtrain.data")

MANIFEST = "manifest.json"
FORMAT = "srtrain-shards/1"
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


def _check_task(args: tuple) -> Checked:
    return check_image(*args)


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
    endpoint_url: str = "",
    region: str = "",
    progress: bool = True,
) -> dict:
    """Builds a shard dataset from `src` into `dest`; returns the manifest (also written last)."""
    from tqdm import tqdm

    split = split or dict(DEFAULT_SPLIT)
    src = str(src)
    if storage.is_s3(dest):
        storage.check_writable(dest, endpoint_url, region)
    workers = workers or len(os.sched_getaffinity(0))
    writers = {s: _SplitWriter(dest, s, shard_size, seed, endpoint_url, region) for s in split}
    skipped: list[dict] = []
    seen_ids: set[str] = set()
    if is_archive(src):
        if not Path(src).is_file():
            raise BuildError(f"{src}: no such archive")
        tasks: Iterator[tuple] = ((name, data, min_size) for name, data in iter_archive(src))
        total = None
    else:
        files = list_files(src, seed)
        if not files:
            raise BuildError(f"{src}: no JPEG, PNG or BMP files found")
        tasks = ((rel, path, min_size) for rel, path in files)
        total = len(files)
    # fork: checkers only run Pillow, and spawned ones would each import TensorFlow (seconds).
    ctx = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
    pool = ctx.Pool(workers) if workers > 1 else None
    with tqdm(total=total, unit="img", desc="build", disable=not progress) as bar:
        # In blocks, so a streamed archive is never read far ahead of the checkers.
        while block := _take(tasks, 64 * workers):
            checked = (
                pool.imap(_check_task, block, chunksize=4) if pool else map(_check_task, block)
            )
            for c in checked:
                bar.update()
                if not c.reason and c.id in seen_ids:
                    c.reason = f"duplicate id {c.id!r} (same name, another extension)"
                if c.reason:
                    skipped.append({"path": c.relpath, "reason": c.reason})
                    continue
                seen_ids.add(c.id)
                writers[split_of(c.id, split, seed)].add(c)
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


# --- manifest, inspect, verify ------------------------------------------------------------------


def load_manifest(uri: str, endpoint_url: str = "", region: str = "") -> dict:
    """The manifest of a shard dataset; one-line StorageError when it is missing or unreadable."""
    storage.check_bucket(uri, endpoint_url, region)
    where = storage.join(uri, MANIFEST)
    try:
        text = storage.read_bytes(where, endpoint_url, region)
    except StorageError as e:
        if str(e).endswith(": not found"):
            raise StorageError(
                f"{where}: not found: no shard dataset here (build one with "
                f"`python -m srtrain.data build SRC {uri}`)"
            ) from None
        raise
    try:
        manifest = json.loads(text)
    except ValueError:
        raise StorageError(f"{where}: not a valid manifest (invalid JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StorageError(f"{where}: not a srtrain shard manifest (format {FORMAT} expected)")
    return manifest


def describe(manifest: dict, uri: str) -> str:
    """What `inspect` prints: counts per split, shard sizes, skipped files and reasons."""
    lines = [
        f"{uri}: {manifest['images']} images from {manifest['source']} "
        f"(seed {manifest['seed']}, min side {manifest['min_size']})"
    ]
    for name, s in manifest["splits"].items():
        sizes = [sh["bytes"] for sh in s["shards"]]
        size_text = f"{_mb(min(sizes))}..{_mb(max(sizes))} each" if sizes else "no shards"
        lines.append(
            f"  {name:<6} {s['images']:>7} images  {len(sizes):>4} shards  "
            f"{_mb(s['bytes'])} ({size_text})"
        )
        lines += [
            f"           {sh['name']}  {sh['images']:>6} images  {_mb(sh['bytes'])}"
            for sh in s["shards"]
        ]
    lines.append(f"  skipped {len(manifest['skipped'])} files")
    lines += [f"    {s['path']}: {s['reason']}" for s in manifest["skipped"]]
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def verify(uri: str, endpoint_url: str = "", region: str = "") -> list[str]:
    """Re-reads every shard and checks size, checksum and row count; returns the problems."""
    manifest = load_manifest(uri, endpoint_url, region)
    problems = []
    for s in manifest["splits"].values():
        for sh in s["shards"]:
            where = storage.join(uri, sh["name"])
            try:
                data = storage.read_bytes(where, endpoint_url, region)
            except StorageError as e:
                problems.append(str(e))
                continue
            if len(data) != sh["bytes"] or hashlib.sha256(data).hexdigest() != sh["sha256"]:
                problems.append(
                    f"{where}: checksum mismatch ({len(data)} bytes, manifest says {sh['bytes']})"
                )
                continue
            rows = pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
            if rows != sh["images"]:
                problems.append(f"{where}: {rows} images, manifest says {sh['images']}")
    return problems


# --- streaming into tf.data ---------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("SRTRAIN_CACHE_DIR") or Path(tempfile.gettempdir(), "srtrain-cache"))


# An uncached S3 shard up to this size is read into memory with one GET; a bigger one is spooled
# to local disk. The reader streams up to 8 shards at once: 8 x 128 MB in memory at most.
IN_MEMORY_MAX = 128 * 2**20


def read_shard(
    uri: str,
    endpoint_url: str = "",
    region: str = "",
    cache_key: str = "",
    columns: tuple[str, ...] = ("id", "image", "height", "width"),
    size: int = 0,
) -> Iterator[tuple]:
    """Rows of one shard as tuples of `columns`, streamed one row group at a time."""
    for block in read_shard_blocks(uri, endpoint_url, region, cache_key, columns, size):
        yield from zip(*block, strict=True)


def read_shard_blocks(
    uri: str,
    endpoint_url: str = "",
    region: str = "",
    cache_key: str = "",
    columns: tuple[str, ...] = ("id", "image", "height", "width"),
    size: int = 0,
    rows: tuple[int, int] | None = None,
    order_seed: list[int] | None = None,
) -> Iterator[tuple[list, ...]]:
    """One shard, one row group at a time: [column values...] per block of up to ROW_GROUP rows.

    `rows` (first, end) limits the read to those rows of the shard (row groups outside it are
    not read); `order_seed` reads the row groups in an order shuffled by it, else in file order.

    An S3 shard arrives with one GET (retried with backoff on transient errors). Without
    `cache_key`, a shard of known `size` up to IN_MEMORY_MAX is read from memory; any other is
    copied to a local file first: with `cache_key` (the shard checksum) the copy stays in the cache
    directory for later epochs, else it is deleted after the pass. Reads without the image
    column (sizes, ids) use ranged requests and copy nothing. A transient error on a local read
    resumes at the first row group not yet delivered.
    """
    plan = dict(rows=rows, order_seed=order_seed)
    small = "image" not in columns
    if storage.is_s3(uri) and not small and not cache_key and 0 < size <= IN_MEMORY_MAX:
        # A sized read in memory costs the client about 40% of the CPU of a spool to disk and
        # back, and the server no more than one streaming GET; ranged requests per row group
        # cost the server more (measured on SeaweedFS).
        data = storage.read_bytes(uri, endpoint_url, region)
        yield from _row_groups(pq.ParquetFile(pa.BufferReader(data)), columns, **plan)
        return
    if storage.is_s3(uri) and not small:
        local = cache_dir() / (f"{cache_key}.parquet" if cache_key else "spool")
        if not cache_key:
            local.mkdir(parents=True, exist_ok=True)
            fd, spool = tempfile.mkstemp(dir=local, suffix=".parquet")
            os.close(fd)
            local = Path(spool)
        try:
            if not cache_key or not local.exists():
                storage.download(uri, local, endpoint_url, region)
            yield from read_shard_blocks(str(local), columns=columns, **plan)
        finally:
            if not cache_key:
                local.unlink(missing_ok=True)
        return
    fs, path = storage.resolve(uri, endpoint_url, region)
    done, attempt, delay = 0, 0, 0.5  # done: row groups delivered
    while True:
        try:
            with fs.open_input_file(path) as f:
                # pre_buffer: one coalesced range request per row group, not one per column page.
                pf = pq.ParquetFile(f, pre_buffer=True)
                for block in _row_groups(pf, columns, start=done, **plan):
                    yield block
                    done += 1
            return
        except OSError as e:
            attempt += 1
            if not storage._transient(e) or attempt >= 5:
                raise storage._explain(uri, e, endpoint_url, region) from None
            log.warning("%s: %s; retrying in %.1f s", uri, storage._reason(e), delay)
            time.sleep(delay)
            delay *= 2


def _row_groups(
    pf: pq.ParquetFile,
    columns: tuple[str, ...],
    rows: tuple[int, int] | None = None,
    order_seed: list[int] | None = None,
    start: int = 0,
) -> Iterator[tuple[list, ...]]:
    first, end = rows or (0, pf.metadata.num_rows)
    plan, base = [], 0  # (row group, first row in it, end row in it)
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        lo, hi = max(first, base), min(end, base + n)
        if lo < hi:
            plan.append((g, lo - base, hi - base))
        base += n
    if order_seed is not None:
        plan = [plan[i] for i in np.random.default_rng(order_seed).permutation(len(plan))]
    for g, lo, hi in plan[start:]:
        table = pf.read_row_group(g, columns=list(columns)).slice(lo, hi - lo)
        yield tuple(table.column(c).to_pylist() for c in columns)


def deal(counts: list[int], index: int, count: int, limit: int = 0) -> list[tuple[int, int, int]]:
    """The rows input pipeline `index` of `count` reads: [(shard position, first row, end row)].

    The shards' rows, taken in manifest order (the first `limit` of them when limit > 0), are cut
    into `count` contiguous ranges whose lengths differ by at most one row, whatever the number of
    shards: every pipeline gets an equal share of the images. A shard cut by a range boundary is
    read in part by both neighbours (only the row groups each needs).
    """
    total = sum(counts) if limit <= 0 else min(sum(counts), limit)
    first, end = index * total // count, (index + 1) * total // count
    out, base = [], 0
    for i, n in enumerate(counts):
        lo, hi = max(first, base), min(end, base + n)
        if lo < hi:
            out.append((i, lo - base, hi - base))
        base += n
    return out


def _share(cfg, split: str, index: int, count: int, limit: int) -> tuple[list[dict], list[tuple]]:
    """(the split's shard entries, the rows this pipeline reads as `deal` gives them)."""
    from srtrain.config import ConfigError

    d = cfg.data
    manifest = load_manifest(d.source, d.endpoint_url, d.region)
    if split not in manifest["splits"]:
        raise ConfigError(
            f"data split {split!r}: {d.source} has splits {', '.join(manifest['splits'])}"
        )
    shards = manifest["splits"][split]["shards"]
    if not shards:
        raise StorageError(f"{d.source}: split {split!r} has no images")
    present = storage.list_files(d.source, d.endpoint_url, d.region)
    for sh in shards:
        if sh["name"] not in present:
            raise StorageError(
                f"{storage.join(d.source, sh['name'])}: shard listed in the "
                "manifest is missing (rebuild the dataset)"
            )
    return shards, deal([sh["images"] for sh in shards], index, count, limit)


def image_sizes(
    cfg, split: str, index: int = 0, count: int = 1, limit: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(heights, widths) of the images pipeline `index` of `count` reads, from the shard columns
    alone (ranged reads on S3: no image bytes)."""
    d = cfg.data
    shards, pieces = _share(cfg, split, index, count, limit)
    hw: list[list[int]] = [[], []]
    for i, lo, hi in pieces:
        uri = storage.join(d.source, shards[i]["name"])
        blocks = read_shard_blocks(
            uri, d.endpoint_url, d.region, columns=("height", "width"), rows=(lo, hi)
        )
        for h, w in blocks:
            hw[0] += h
            hw[1] += w
    return np.array(hw[0], np.int64), np.array(hw[1], np.int64)


def records(
    cfg,
    split: str,
    index: int = 0,
    count: int = 1,
    min_size: int = 0,
    *,
    seed: int | None = None,
    start_pass: int = 0,
    limit: int = 0,
):
    """tf.data records {id, image, height, width} of pipeline `index` of `count`'s share of a
    split of the shard dataset `data.source`, without images that have a side below `min_size`.

    The share is `deal`'s: equal numbers of images (within one row) for every pipeline, the
    first `limit` images of the split when limit > 0 (counted before the `min_size` filter).
    With `seed` None: one pass, in shard order (evaluation). With a seed: endless passes from
    `start_pass` on; pass p reads the shards, and the row groups inside each, in an order drawn
    from (seed, p), so no two passes read alike.
    """
    import tensorflow as tf

    d = cfg.data
    shards, pieces = _share(cfg, split, index, count, limit)
    total = sum(sh["images"] for sh in shards) if limit <= 0 else limit
    log.info(
        "pipeline %d/%d reads %d of %d %s images: %s",
        index,
        count,
        sum(hi - lo for _, lo, hi in pieces),
        min(total, sum(sh["images"] for sh in shards)),
        split,
        ",".join(f"{shards[i]['name']}[{lo}:{hi}]" for i, lo, hi in pieces),
    )
    if not pieces and seed is not None:
        raise StorageError(
            f"{d.source}: split {split!r} has {total} images, fewer than the {count} input "
            "pipelines that share it (use fewer workers or more images)"
        )
    keys = {sh["name"]: sh["sha256"] if d.cache else "" for sh in shards}
    sizes = {sh["name"]: sh["bytes"] for sh in shards}
    seed = None if seed is None else seed % 2**63
    # A row group per Python call (not a row): the generator crosses into Python rarely, and the
    # interleave of shard streams hands on whole row groups (unbatched after it, not before).
    columns = ("id", "image", "height", "width")
    spec = {
        "id": tf.TensorSpec([None], tf.string),
        "image": tf.TensorSpec([None], tf.string),
        "height": tf.TensorSpec([None], tf.int32),
        "width": tf.TensorSpec([None], tf.int32),
    }

    @tf.autograph.experimental.do_not_convert  # a Python generator: nothing to convert
    def shard_blocks(piece: dict) -> tf.data.Dataset:
        def gen(n: bytes, lo: int, hi: int, p: int, k: int):
            n = n.decode()
            uri = storage.join(d.source, n)
            order = None if seed is None else [seed, int(p), int(k)]
            for block in read_shard_blocks(
                uri, d.endpoint_url, d.region, keys[n], columns, sizes[n], (lo, hi), order
            ):
                rows = dict(zip(columns, block, strict=True))
                sides = zip(rows["height"], rows["width"], strict=True)
                keep = [j for j, hw in enumerate(sides) if min(hw) >= min_size]
                if len(keep) < len(rows["id"]):
                    rows = {c: [v[j] for j in keep] for c, v in rows.items()}
                yield rows

        args = (piece["name"], piece["lo"], piece["hi"], piece["pass"], piece["piece"])
        return tf.data.Dataset.from_generator(gen, output_signature=spec, args=args)

    table = {
        "name": tf.constant([shards[i]["name"] for i, _, _ in pieces], tf.string),
        "lo": tf.constant([lo for _, lo, _ in pieces], tf.int64),
        "hi": tf.constant([hi for _, _, hi in pieces], tf.int64),
        "piece": tf.range(len(pieces), dtype=tf.int64),
    }
    if seed is None:
        units = tf.data.Dataset.from_tensor_slices(
            {**table, "pass": tf.zeros([len(pieces)], tf.int64)}
        )
    else:

        def one_pass(p):  # this pipeline's pieces in the order of pass p
            u = tf.random.stateless_uniform(
                [len(pieces)], tf.stack([tf.constant(seed, tf.int64), p])
            )
            order = tf.argsort(u)
            piece = {k: tf.gather(v, order) for k, v in table.items()}
            return tf.data.Dataset.from_tensor_slices({**piece, "pass": tf.fill([len(pieces)], p)})

        units = tf.data.Dataset.range(start_pass, 2**62).flat_map(one_pass)
    cycle = max(1, min(len(pieces), 8))
    ds = units.interleave(
        shard_blocks,
        cycle_length=cycle,
        block_length=1,
        num_parallel_calls=cycle,
        deterministic=True,
    )
    return ds.unbatch()
