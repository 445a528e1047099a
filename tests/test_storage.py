"""storage: local and S3 round trips, retries, and the one-line messages for every failure."""

from __future__ import annotations

import time

import pyarrow.fs as pafs
import pytest

from srtrain import storage
from srtrain.storage import StorageError


def test_local_write_is_atomic_and_readable(tmp_path):
    uri = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(uri, b"x" * 10)
    assert storage.read_bytes(uri) == b"x" * 10
    assert storage.exists(uri)
    assert storage.list_files(str(tmp_path / "a")) == {"b.bin": 10}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.bin"]  # no temp files left


def test_one_cache_setting_with_the_old_shard_variable_still_honoured(monkeypatch, tmp_path):
    monkeypatch.delenv("SRTRAIN_CACHE", raising=False)
    monkeypatch.delenv("SRTRAIN_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert storage.cache_dir("vgg19") == tmp_path / "home" / ".cache" / "srtrain" / "vgg19"
    monkeypatch.setenv("SRTRAIN_CACHE", str(tmp_path / "c"))
    assert storage.cache_dir("shards") == tmp_path / "c" / "shards"
    monkeypatch.setenv("SRTRAIN_CACHE_DIR", str(tmp_path / "old"))
    assert storage.cache_dir("shards") == tmp_path / "old"
    assert storage.cache_dir("vgg19") == tmp_path / "c" / "vgg19"


def test_local_missing_file_names_the_uri(tmp_path):
    uri = str(tmp_path / "nope.json")
    with pytest.raises(StorageError, match=r"nope\.json: not found$"):
        storage.read_bytes(uri)


def test_retry_backs_off_on_transient_errors_then_succeeds(monkeypatch):
    sleeps, calls = [], []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError(
                "AWS Error NETWORK_CONNECTION during GetObject: curlCode 56, connection reset"
            )
        return "ok"

    assert storage.retry(flaky, "s3://b/k") == "ok"
    assert sleeps == [0.5, 1.0]


def test_retry_gives_up_with_one_line(monkeypatch):
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)

    calls = []

    def dead():
        calls.append(1)
        raise OSError("AWS Error NETWORK_CONNECTION: curlCode: 28, Timeout was reached")

    with pytest.raises(StorageError, match=r"^s3://b/k: cannot reach the endpoint") as e:
        storage.retry(dead, "s3://b/k", attempts=3)
    assert "\n" not in str(e.value)
    assert len(calls) == 3


def test_permanent_errors_are_not_retried(monkeypatch):
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)

    def denied():
        raise OSError("AWS Error ACCESS_DENIED during HeadObject operation: No response body.")

    with pytest.raises(StorageError, match="access denied: check AWS_ACCESS_KEY_ID"):
        storage.retry(denied, "s3://b/k")
    assert sleeps == []


@pytest.mark.s3
def test_s3_round_trip_and_failures(s3, s3_env, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    base = f"s3://{s3.bucket}/storage-test"
    storage.write_bytes(f"{base}/x.bin", b"hello")
    assert storage.read_bytes(f"{base}/x.bin") == b"hello"
    assert storage.list_files(base) == {"x.bin": 5}

    with pytest.raises(StorageError, match=rf"^{base}/missing: not found$"):
        storage.read_bytes(f"{base}/missing")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/x: the bucket does not exist$"):
        storage.read_bytes("s3://no-such-bucket/x")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket: the bucket does not exist$"):
        storage.check_bucket("s3://no-such-bucket/prefix")

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=rf"^{base}/x.bin: access denied"):
        storage.read_bytes(f"{base}/x.bin")
    assert time.monotonic() - t0 < 10


@pytest.mark.s3
def test_s3_download_is_atomic(s3, s3_env, monkeypatch, tmp_path):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    uri = f"s3://{s3.bucket}/storage-test/blob"
    storage.write_bytes(uri, bytes(range(256)) * 1000)
    storage.download(uri, tmp_path / "c" / "blob")
    assert (tmp_path / "c" / "blob").read_bytes() == bytes(range(256)) * 1000
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["blob"]


def test_unreachable_endpoint_fails_within_a_minute(monkeypatch):
    from seaweed import free_ports

    port = free_ports(1)[0]  # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr(storage.time, "sleep", lambda s: None)
    t0 = time.monotonic()
    # The digits in the key are a date and a step, not HTTP statuses.
    uri = "s3://b/runs/base-20260403-101500/checkpoint_00500/model.keras"
    with pytest.raises(StorageError, match=rf"^{uri}: cannot reach the endpoint"):
        storage.read_bytes(uri)
    assert time.monotonic() - t0 < 60
    assert isinstance(storage.s3_filesystem(), pafs.S3FileSystem)


# Messages exactly as pyarrow 26 raised them against SeaweedFS (and an unreachable endpoint),
# under keys whose digits the old classifier mistook for HTTP statuses; the last three follow
# pyarrow's format for errors SeaweedFS cannot be made to return.
REAL_MESSAGES = [
    (
        FileNotFoundError,
        "[Errno 2] Path does not exist 'bkt/run-0403-x/checkpoint_00500/missing'. "
        "Detail: [errno 2] No such file or directory",
        "not found",
        False,
    ),
    (
        OSError,
        "When reading information for key 'run-0404-x/ok.bin' in bucket 'bkt': AWS Error "
        "ACCESS_DENIED during HeadObject operation: No response body.",
        "access denied",
        False,
    ),
    (
        OSError,
        "When listing objects under key 'runs/checkpoint_00500/' in bucket 'bkt': AWS Error "
        "SIGNATURE_DOES_NOT_MATCH during ListObjectsV2 operation: The request signature we "
        "calculated does not match the signature you provided. Check your key and signing "
        "method. (Request ID: 18EE1653C0236846368D0BEB)",
        "access denied",
        False,
    ),
    (
        OSError,
        "When initiating multiple part upload for key 'run-0500-x/w.bin' in bucket 'bkt': AWS "
        "Error INVALID_ACCESS_KEY_ID during CreateMultipartUpload operation: The access key ID "
        "you provided does not exist in our records. (Request ID: 18EE1653C05255DB53C8B5C2)",
        "access denied",
        False,
    ),
    (
        OSError,
        "When reading information for key 'runs/base-20260403-1015/checkpoint_00500/model.keras'"
        " in bucket 'bkt': AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: "
        "7, Could not connect to server; Details: Failed to connect to 127.0.0.1:48029 after 0 "
        "ms: Could not connect to server",
        "cannot reach the endpoint",
        True,
    ),
    (
        OSError,
        "When reading from key 'runs/base-0403/shard-00404.parquet' in bucket 'bkt': AWS Error "
        "NETWORK_CONNECTION during GetObject operation: curlCode: 28, Timeout was reached",
        "cannot reach the endpoint",
        True,
    ),
    (
        OSError,
        "When reading from key 'runs/base-0403/x' in bucket 'bkt': AWS Error SLOW_DOWN during "
        "GetObject operation: Please reduce your request rate.",
        "cannot reach the endpoint",
        True,
    ),
    (
        OSError,
        "When reading from key 'checkpoint_00500/x' in bucket 'bkt': AWS Error UNKNOWN (HTTP "
        "status 403) during GetObject operation: Forbidden",
        "access denied",
        False,
    ),
]


@pytest.mark.parametrize(("error", "text", "reason", "transient"), REAL_MESSAGES)
def test_errors_are_classified_by_code_not_by_digits_in_the_key(error, text, reason, transient):
    err = error(text)
    assert storage._reason(err).startswith(reason)
    assert storage._transient(err) is transient


@pytest.mark.s3
def test_s3_failures_on_keys_with_status_like_digits(s3, s3_env, monkeypatch):
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    sleeps = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    base = f"s3://{s3.bucket}/runs/base-20260403-101500"
    storage.write_bytes(f"{base}/checkpoint_00404/x.bin", b"hello")

    with pytest.raises(StorageError, match=rf"^{base}/checkpoint_00403/model.keras: not found$"):
        storage.read_bytes(f"{base}/checkpoint_00403/model.keras")

    # A wrong secret is refused at once, whatever digits the key holds: no retries.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageError, match=rf"^{base}/checkpoint_00404/x.bin: access denied"):
        storage.read_bytes(f"{base}/checkpoint_00404/x.bin")
    with pytest.raises(StorageError, match=rf"^{base}/checkpoint_00500/y.bin: access denied"):
        storage.write_bytes(f"{base}/checkpoint_00500/y.bin", b"x")
    with pytest.raises(StorageError, match=rf"^{base}/checkpoint_00500: access denied"):
        storage.list_files(f"{base}/checkpoint_00500")
    assert sleeps == []
