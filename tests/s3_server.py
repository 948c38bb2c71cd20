"""A real S3-compatible endpoint for tests and benchmarks: moto in server mode on loopback.

``moto.server`` runs in its own process (not ``ThreadedMotoServer``), so its request handling does
not compete for the GIL with the code under test and the benchmark times stay honest.

Use in tests::

    from tests.s3_server import aws_connection, s3_server  # noqa: F401

    def test_upload(s3_server, aws_connection):
        ...  # s3_server.endpoint_url, s3_server.bucket; aws_connection is an Airflow conn id

or outside pytest: ``with moto_s3_server() as server: ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import IO

import pytest

AWS_CONN_ID = "checkpoint_s3"


@dataclasses.dataclass(frozen=True)
class S3Server:
    """Where the moto server listens, a bucket on it, and the (arbitrary) credentials it accepts."""

    endpoint_url: str
    bucket: str
    access_key: str = "testing-access-key"
    secret_key: str = "testing-secret-key-do-not-log"
    region: str = "us-east-1"

    def storage_options(self) -> dict:
        """fsspec/s3fs options reaching this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": self.region},
        }

    def boto3_client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )


@contextlib.contextmanager
def moto_s3_server(bucket: str = "checkpoints", startup_timeout: float = 60.0) -> Iterator[S3Server]:
    """Start ``python -m moto.server`` on a free loopback port, create ``bucket``, stop on exit."""
    port = _free_port()
    endpoint_url = f"http://127.0.0.1:{port}"
    # Request logs go to a file: an undrained pipe would fill up and stall the server.
    with tempfile.TemporaryFile() as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_listening(endpoint_url, process, log_file, startup_timeout)
            server = S3Server(endpoint_url=endpoint_url, bucket=bucket)
            server.boto3_client().create_bucket(Bucket=bucket)
            yield server
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server with an empty bucket, shared by the whole test session."""
    with moto_s3_server() as server:
        yield server


@pytest.fixture
def aws_connection(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """An Airflow ``aws`` connection (env var, JSON form) to the moto server; returns its conn id.

    Extras: ``endpoint_url`` and ``region_name`` as the amazon provider reads them, and
    ``bucket_name``/``prefix`` naming where checkpoints go.
    """
    connection = {
        "conn_type": "aws",
        "login": s3_server.access_key,
        "password": s3_server.secret_key,
        "extra": {
            "endpoint_url": s3_server.endpoint_url,
            "region_name": s3_server.region,
            "bucket_name": s3_server.bucket,
            "prefix": "ckpt",
        },
    }
    monkeypatch.setenv(f"AIRFLOW_CONN_{AWS_CONN_ID.upper()}", json.dumps(connection))
    # boto3 must never fall back to real AWS credentials of the machine running the tests.
    for name in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    return AWS_CONN_ID


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_listening(
    endpoint_url: str, process: subprocess.Popen, log_file: IO[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log_file.seek(0)
            output = log_file.read().decode(errors="replace")
            raise RuntimeError(f"moto server exited with code {process.returncode}: {output[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint_url}/moto-api/", timeout=1):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"moto server at {endpoint_url} did not answer within {timeout} s")


if __name__ == "__main__":  # pragma: no cover - manual use
    with moto_s3_server() as srv:
        print(f"moto S3 at {srv.endpoint_url}, bucket {srv.bucket}; Ctrl-C to stop", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    os._exit(0)
