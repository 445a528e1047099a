"""Reading and writing run outputs and datasets on a local disk or S3-compatible object storage.

Every location is a URI: a local path, or `s3://bucket/prefix`. S3 goes through
`pyarrow.fs.S3FileSystem` (no tensorflow-io). The endpoint comes from `endpoint_url` (the job's
`data.endpoint_url`) or the AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 environment variables, because a
constructed S3FileSystem ignores them; credentials come from the standard AWS chain and are never
printed. Problems a user can fix raise `StorageError` with one line naming the URI.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import urllib.parse
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A storage location is missing, unreachable or refuses our credentials."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def endpoint(endpoint_url: str = "") -> str:
    return (
        endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3", "")
        or os.environ.get("AWS_ENDPOINT_URL", "")
    )


def s3_filesystem(endpoint_url: str = "", region: str = "") -> pafs.S3FileSystem:
    url = endpoint(endpoint_url)
    kwargs: dict = {
        "region": region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1",
        "connect_timeout": 5,
        "request_timeout": 30,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
    }
    if url:
        parsed = urllib.parse.urlparse(url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible servers (MinIO, SeaweedFS, Ceph) expect path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str, endpoint_url: str = "", region: str = "") -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a URI; local paths become absolute."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(endpoint_url, region), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(Path(uri, *parts))


def _explain(uri: str, err: Exception) -> StorageError:
    text = str(err)
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "nosuchbucket" in low:
        why = "the bucket does not exist"
    elif any(s in low for s in ("accessdenied", "access denied", "invalidaccesskeyid",
                                "signaturedoesnotmatch", "forbidden", "403")):
        why = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the role"
    elif isinstance(err, FileNotFoundError) or "not found" in low or "nosuchkey" in low:
        why = "not found"
    elif any(s in low for s in ("connection", "curl", "timed out", "timeout", "resolve")):
        why = f"cannot reach the endpoint {endpoint() or 'of AWS S3'}"
    else:
        why = text.splitlines()[0] if text else type(err).__name__
    return StorageError(f"{uri}: {why}")


def read_bytes(uri: str, endpoint_url: str = "", region: str = "") -> bytes:
    fs, path = resolve(uri, endpoint_url, region)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except (OSError, FileNotFoundError) as e:
        raise _explain(uri, e) from None


def write_bytes(uri: str, data: bytes, endpoint_url: str = "", region: str = "") -> None:
    """Writes a whole object: a reader sees the old content or the new, never a partial file."""
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return
    fs, path = resolve(uri, endpoint_url, region)
    try:
        # An S3 PUT is atomic: the object appears whole when the stream closes.
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as e:
        raise _explain(uri, e) from None


def exists(uri: str, endpoint_url: str = "", region: str = "") -> bool:
    fs, path = resolve(uri, endpoint_url, region)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _explain(uri, e) from None


def check_writable(uri: str, endpoint_url: str = "", region: str = "") -> None:
    """Fails fast (one line) when a storage location cannot be written, before any work starts."""
    if not is_s3(uri):
        path = Path(uri).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"{uri}: cannot create directory ({e.strerror})") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"{uri}: directory is not writable")
        return
    fs, path = resolve(uri, endpoint_url, region)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise _explain(f"s3://{bucket}", e) from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"s3://{bucket}: the bucket does not exist")
    probe = posixpath.join(path, ".srtrain-write-probe")
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise _explain(uri, e) from None
