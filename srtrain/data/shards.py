"""Reading a shard dataset into tf.data: each input pipeline's share of a split, row group by row
group, from a local directory or `s3://bucket/prefix` (the format: `srtrain.data.manifest`).

pyarrow reads the Parquet shards from local disk and S3 alike, one row group at a time, and the
small columns (ids, sizes) without touching the image bytes.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from srtrain import storage
from srtrain.data.manifest import load_manifest
from srtrain.storage import StorageError

log = logging.getLogger("srtrain.data")


# An uncached S3 shard up to this size is read into memory with one GET; a bigger one is spooled
# to local disk. The reader streams up to 8 shards at once: 8 x 128 MB in memory at most.
IN_MEMORY_MAX = 128 * 2**20


def read_shard(uri: str, **options) -> Iterator[tuple]:
    """Rows of one shard as tuples of `columns`: `read_shard_blocks(uri, **options)` row by row."""
    for block in read_shard_blocks(uri, **options):
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
        # Cheaper for the client than a spool to disk and back, and for the server than ranged
        # requests per row group (bench/README.md).
        data = storage.read_bytes(uri, endpoint_url, region)
        yield from _row_groups(pq.ParquetFile(pa.BufferReader(data)), columns, **plan)
        return
    if storage.is_s3(uri) and not small:
        local = storage.cache_dir("shards") / (f"{cache_key}.parquet" if cache_key else "spool")
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
