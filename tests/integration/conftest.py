"""Fixtures for the integration tests."""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs
import pytest

from tests.conftest import write_jsonl
from tests.integration.jobs import ROWS


@pytest.fixture(scope="module")
def prompts(t0_rows, tmp_path_factory) -> Path:
    """24 short real prompts from the shared T0 mix, with their `id` column."""
    short = [r for r in t0_rows if len(r["prompt"]) < 500][:ROWS]
    return write_jsonl(tmp_path_factory.mktemp("data") / "t0_short.jsonl", short)


CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "runner-test-key",
    "AWS_SECRET_ACCESS_KEY": "runner-test-secret-42",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"{host}:{port}"
    fs = pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme="http",
        region="us-east-1",
        access_key=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        secret_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        allow_bucket_creation=True,
    )
    fs.create_dir("runner-test")
    yield endpoint, fs
    server.stop()
