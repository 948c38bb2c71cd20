"""A real MLflow tracking server for tests: ``mlflow server`` on loopback, sqlite backend.

Artifacts go through the server (``--artifacts-destination``, a temp dir), as they would for Ray
workers on other machines: clients only need the server's URL. Use in tests::

    def test_something(mlflow_server):  # the session fixture in conftest.py
        ...  # mlflow_server.uri, e.g. "http://127.0.0.1:40123"

or outside pytest: ``with local_mlflow_server() as server: ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.s3_server import _free_port


@dataclasses.dataclass(frozen=True)
class MlflowServer:
    uri: str
    root: Path
    started_in_s: float


@contextlib.contextmanager
def local_mlflow_server(startup_timeout: float = 120.0) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` on a free loopback port with a fresh sqlite DB; stop it on exit."""
    root = Path(tempfile.mkdtemp(prefix="airflow-ray-mlflow-"))
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
        f"--artifacts-destination={root / 'artifacts'}",
    ]
    # No background job runner (huey): the tests need tracking and the registry only.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    started = time.monotonic()
    with open(root / "server.log", "wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_until_healthy(uri, process, root / "server.log", startup_timeout)
        yield MlflowServer(uri=uri, root=root, started_in_s=round(time.monotonic() - started, 1))
    finally:
        # The server forks a uvicorn worker: end the whole process group we started.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 15)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()
        shutil.rmtree(root, ignore_errors=True)


def _wait_until_healthy(uri: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}: {log.read_text()[-3000:]}")
        with (
            contextlib.suppress(urllib.error.URLError, ConnectionError),
            urllib.request.urlopen(f"{uri}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"mlflow server at {uri} not healthy after {timeout} s: {log.read_text()[-3000:]}")
