"""Reading and writing run outputs and datasets on a local disk or S3-compatible object storage.

Every location is a URI: a local path, or `s3://bucket/prefix`. S3 goes through
`pyarrow.fs.S3FileSystem` (no tensorflow-io). The endpoint comes from `endpoint_url` (the job's
`data.endpoint_url`) or the AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 environment variables, because a
constructed S3FileSystem ignores them; credentials come from the standard AWS chain and are never
printed. Problems a user can fix raise `StorageError` with one line naming the URI.
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
import time
import urllib.parse
from pathlib import Path

import pyarrow.fs as pafs

log = logging.getLogger(__name__)


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
        "region": region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
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
        return s3_filesystem(endpoint_url, region), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(Path(uri, *parts))


def bucket_of(uri: str) -> str:
    return str(uri)[len("s3://") :].split("/", 1)[0]


# pyarrow reports an S3 failure as "When reading information for key 'K' in bucket 'B': AWS Error
# CODE during OP operation: MESSAGE", with "UNKNOWN (HTTP status N)" for a code the SDK does not
# name. The code decides what happened; the names never do: keys like "run-0403" or
# "checkpoint_00500" must not turn a timeout into "access denied" or a refusal into a retry.
_AWS_ERROR = re.compile(r"AWS Error (?P<code>[A-Z_]+)(?: \(HTTP status (?P<status>\d+)\))? during ")
# pyarrow quotes every key, bucket and path it names; an apostrophe inside a word ("Couldn't")
# opens no quote.
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)")
_DENIED_CODES = {
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "INVALID_SIGNATURE",
    "INCOMPLETE_SIGNATURE",
    "INVALID_CLIENT_TOKEN_ID",
    "UNRECOGNIZED_CLIENT",
    "MISSING_AUTHENTICATION_TOKEN",
}
_MISSING_CODES = {"NO_SUCH_KEY", "RESOURCE_NOT_FOUND", "NO_SUCH_UPLOAD"}
_TRANSIENT_CODES = {
    "NETWORK_CONNECTION",
    "REQUEST_TIMEOUT",
    "SLOW_DOWN",
    "THROTTLING",
    "SERVICE_UNAVAILABLE",
    "INTERNAL_FAILURE",
}
# Words for errors that carry no code (local files, the network below the SDK), matched on the
# message with every quoted name removed, and never digits.
_DENIED_WORDS = ("accessdenied", "forbidden", "expiredtoken", "tokenhasexpired", "invalidtoken")
_MISSING_WORDS = ("notfound", "nosuchkey", "pathdoesnotexist")
_TRANSIENT_WORDS = (
    "timeout",
    "timedout",
    "connectionreset",
    "connectionrefused",
    "brokenpipe",
    "couldn'tconnect",
    "couldnotconnect",
    "slowdown",
    "serviceunavailable",
    "internalerror",
    "throttl",
    "unexpectedend",
)
_UNREACHABLE_WORDS = (
    "couldn'tconnect",
    "couldnotconnect",
    "connectionrefused",
    "couldn'tresolve",
    "couldnotresolve",
)


def _words(err: Exception) -> str:
    """The message without the names in it, lower case, no spaces or underscores."""
    text = _QUOTED.sub("", str(err))
    return text.lower().replace("_", "").replace(" ", "")


def _kind(err: Exception) -> str:
    """What went wrong: "no-bucket", "denied", "missing", "transient" or "other"."""
    found = _AWS_ERROR.findall(_QUOTED.sub("", str(err)))
    if found:
        code, status = found[-1]
        status = int(status or 0)
        if code == "NO_SUCH_BUCKET":
            return "no-bucket"
        if code in _DENIED_CODES or status == 403:
            return "denied"
        if code in _MISSING_CODES or status == 404:
            return "missing"
        if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500:
            return "transient"
        if code != "UNKNOWN" or status:
            return "denied" if any(w in _words(err) for w in _DENIED_WORDS) else "other"
    if isinstance(err, FileNotFoundError):
        return "missing"
    if isinstance(err, PermissionError):
        return "other"  # a local file's own message says it best
    if isinstance(err, (TimeoutError, ConnectionError)):
        return "transient"
    words = _words(err)
    if "nosuchbucket" in words or "bucketdoesnotexist" in words:
        return "no-bucket"
    for kind, hints in (
        ("denied", _DENIED_WORDS),
        ("missing", _MISSING_WORDS),
        ("transient", _TRANSIENT_WORDS),
    ):
        if any(w in words for w in hints):
            return kind
    return "other"


def _reason(err: Exception) -> str:
    """The user-facing part of a storage error, without the SDK's noise."""
    kind = _kind(err)
    if kind == "no-bucket":
        return "the bucket does not exist"
    if kind == "denied":
        return "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the role"
    if kind == "missing":
        return "not found"
    if kind == "transient":
        return f"cannot reach the endpoint {endpoint() or 'of AWS S3'}"
    text = str(err)
    return text.splitlines()[0] if text else type(err).__name__


def _explain(uri: str, err: Exception, endpoint_url: str = "", region: str = "") -> StorageError:
    why = _reason(err)
    if why == "not found" and is_s3(uri):
        # S3 answers a HEAD on a key in a missing bucket with 404 too: name the real problem.
        try:
            fs = s3_filesystem(endpoint_url, region)
            if fs.get_file_info(bucket_of(uri)).type == pafs.FileType.NotFound:
                why = "the bucket does not exist"
        except OSError:
            pass
    return StorageError(f"{uri}: {why}")


def _unreachable(err: Exception) -> bool:
    words = _words(err)
    return _kind(err) == "transient" and any(w in words for w in _UNREACHABLE_WORDS)


def _transient(err: Exception) -> bool:
    """Errors worth retrying: the network or the server, not our request or credentials."""
    return _kind(err) == "transient"


def retry(
    fn,
    uri: str,
    *,
    attempts: int = 5,
    deadline: float = 45.0,
    endpoint_url: str = "",
    region: str = "",
):
    """fn() with exponential backoff (0.5, 1, 2, 4 s) on transient errors; others fail at once.

    Gives up after `attempts` tries or `deadline` seconds, whichever comes first, so a dead
    endpoint ends in one StorageError naming the URI, never a hang.
    """
    start, delay = time.monotonic(), 0.5
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except OSError as e:
            last_try = attempt == attempts or time.monotonic() + delay - start > deadline
            # pyarrow already retried a refused connection 5 times (~8 s): the endpoint is down.
            if not _transient(e) or _unreachable(e) or last_try:
                raise _explain(uri, e, endpoint_url, region) from None
            log.warning(
                "%s: %s; retrying in %.1f s (attempt %d of %d)",
                uri,
                _reason(e),
                delay,
                attempt + 1,
                attempts,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def read_bytes(uri: str, endpoint_url: str = "", region: str = "") -> bytes:
    fs, path = resolve(uri, endpoint_url, region)

    def read() -> bytes:
        # A random-access file knows its size: one sized GET, several times cheaper for client
        # and server than an input stream's read() of the same object (bench/README.md).
        with fs.open_input_file(path) as f:
            return f.read()

    return retry(read, uri, endpoint_url=endpoint_url, region=region)


def write_bytes(uri: str, data: bytes, endpoint_url: str = "", region: str = "") -> None:
    """Writes a whole object: a reader sees the old content or the new, never a partial file."""
    if not is_s3(uri):
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide a shared dataset from others
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

    def put() -> None:
        # An S3 PUT is atomic: the object appears whole when the stream closes.
        with fs.open_output_stream(path) as f:
            f.write(data)

    retry(put, uri, endpoint_url=endpoint_url, region=region)


def exists(uri: str, endpoint_url: str = "", region: str = "") -> bool:
    fs, path = resolve(uri, endpoint_url, region)
    info = retry(lambda: fs.get_file_info(path), uri, endpoint_url=endpoint_url, region=region)
    return info.type != pafs.FileType.NotFound


def list_files(uri: str, endpoint_url: str = "", region: str = "") -> dict[str, int]:
    """{name: size} of the files directly under a directory or S3 prefix ({} if none)."""
    fs, path = resolve(uri, endpoint_url, region)
    selector = pafs.FileSelector(path, allow_not_found=True)
    infos = retry(lambda: fs.get_file_info(selector), uri, endpoint_url=endpoint_url, region=region)
    return {i.base_name: i.size for i in infos if i.type == pafs.FileType.File}


def check_bucket(uri: str, endpoint_url: str = "", region: str = "") -> None:
    """One-line StorageError when an s3:// URI's bucket is missing or refuses us; local: no-op."""
    if not is_s3(uri):
        return
    fs = s3_filesystem(endpoint_url, region)
    bucket = bucket_of(uri)
    info = retry(
        lambda: fs.get_file_info(bucket), f"s3://{bucket}", endpoint_url=endpoint_url, region=region
    )
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"s3://{bucket}: the bucket does not exist")


def cache_dir(kind: str) -> Path:
    """Where local copies of stored objects of one kind go: `$SRTRAIN_CACHE/<kind>`, by default
    ~/.cache/srtrain/<kind>. Kinds: "shards" (`data.cache` copies and spool files of the shard
    reader) and "vgg19" (VGG19 weights from S3). SRTRAIN_CACHE_DIR, the shards' older setting,
    still names their directory when it is set."""
    if kind == "shards" and os.environ.get("SRTRAIN_CACHE_DIR"):
        return Path(os.environ["SRTRAIN_CACHE_DIR"])
    return Path(os.environ.get("SRTRAIN_CACHE") or "~/.cache/srtrain").expanduser() / kind


def download(uri: str, local_path: str | Path, endpoint_url: str = "", region: str = "") -> None:
    """Copies an object to a local file atomically (a concurrent reader never sees half of it)."""
    fs, path = resolve(uri, endpoint_url, region)
    local_path = Path(local_path)
    local_path.parent.mkdir(parents=True, exist_ok=True)

    def copy() -> None:
        fd, tmp = tempfile.mkstemp(dir=local_path.parent, prefix=f".{local_path.name}.")
        try:
            with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
                while chunk := src.read(8 << 20):
                    out.write(chunk)
            os.replace(tmp, local_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    retry(copy, uri, endpoint_url=endpoint_url, region=region)


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
    info = retry(
        lambda: fs.get_file_info(bucket), f"s3://{bucket}", endpoint_url=endpoint_url, region=region
    )
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"s3://{bucket}: the bucket does not exist")
    probe = posixpath.join(path, ".srtrain-write-probe")
    try:
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as e:
        raise _explain(uri, e) from None
