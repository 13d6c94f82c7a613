"""Shared fixtures: a real S3 endpoint over HTTP (moto's server in a child process)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from moe_cpt.infra.local_s3 import LocalS3


@pytest.fixture(scope="session")
def s3_server() -> Iterator[LocalS3]:
    """One local S3 server for the session; its AWS_* settings are exported to the environment
    (child processes such as datatrove workers inherit them)."""
    server = LocalS3().start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server: LocalS3) -> str:
    """A fresh, empty bucket; returns its URL ``s3://<name>``."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    fs.mkdir(name)
    return f"s3://{name}"
