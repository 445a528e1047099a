"""The manifest of a shard dataset, and what `inspect` and `verify` report from it.

A dataset is a directory or `s3://bucket/prefix` holding Parquet shards (`<split>-NNNNN.parquet`,
written by `srtrain.data.builder`) and a `manifest.json` written last: per split its shards with
their image count, size and SHA-256, and the files the build skipped, with the reason.

    python -m srtrain.data inspect DEST
    python -m srtrain.data verify DEST
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from srtrain import storage
from srtrain.storage import StorageError

MANIFEST = "manifest.json"
FORMAT = "srtrain-shards/1"


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
    if manifest.get("train_scales"):
        factors = ", ".join(f"{s:g}" for s in manifest["train_scales"])
        lines.append(
            f"  train holds {manifest['train_copies']} downscaled copies of its photos "
            f"(x {factors})"
        )
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
