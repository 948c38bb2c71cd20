"""A Ray cluster needs Ray, not airflow-ray: everything Ray-side runs from a virtualenv without it.

The cluster here is started from a second virtualenv that has the same Ray release and the data
libraries (numpy, pandas, pyarrow, fsspec, xxhash) but neither Airflow nor airflow-ray, so every
process on it (owner actors, ``@ray_task`` workers, checkpoint writes and restores) runs only
what :mod:`airflow_ray._worker` shipped by value. Its node alone has the custom resource ``bare``
that the test DAG's Ray tasks ask for. The Airflow side (the driver) is this suite's virtualenv.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import TESTS
from tests.helpers import kill_cluster, script_report

pytestmark = pytest.mark.slow

#: What a Ray cluster for airflow-ray needs (docs/deploy: "the cluster side"), at this suite's versions.
CLUSTER_PACKAGES = ("ray", "numpy", "pandas", "pyarrow", "fsspec", "xxhash")


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory):
    """``ray start --head`` from a virtualenv without airflow-ray; yields its GCS address."""
    from airflow_ray import cluster
    from tests.s3_server import _free_port

    venv = tmp_path_factory.mktemp("bare-venv")
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in CLUSTER_PACKAGES]
    uv = [sys.executable, "-m", "uv"]
    made = subprocess.run([*uv, "venv", "-q", "-p", sys.base_prefix + "/bin/python3", str(venv)], check=False)
    installed = (
        made.returncode == 0
        and (
            subprocess.run(
                [*uv, "pip", "install", "-q", "-p", str(venv / "bin" / "python"), *pins], check=False
            )
        ).returncode
        == 0
    )
    if not installed:
        pytest.skip(f"could not build a virtualenv with {pins} (no package index reachable?)")
    python = venv / "bin" / "python"
    absent = subprocess.run([python, "-c", "import airflow_ray"], capture_output=True, cwd=venv)
    assert absent.returncode != 0, "the bare virtualenv must not see airflow-ray"

    cluster.ensure_token()
    temp_dir = tempfile.mkdtemp(prefix="arb-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    env = {**os.environ, **cluster.LOCAL_ENV, "PYTHONPATH": ""}
    start = [
        str(venv / "bin" / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=2",
        "--resources=" + json.dumps({"bare": 2}),
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180, cwd=venv)
    try:
        yield {"address": f"127.0.0.1:{port}", "python": str(python)}
    finally:
        # Never `ray stop`: it kills every cluster. Killed, not stopped: faster by 10 s.
        kill_cluster(temp_dir, f"127.0.0.1:{port}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_tasks_checkpoints_and_restores_run_on_a_cluster_without_airflow_ray(bare_cluster, tmp_path):
    env = {
        **os.environ,
        "RAY_ADDRESS": bare_cluster["address"],
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # the cluster listens on loopback only
        "AIRFLOW__RAY__CHECKPOINT_PATH": (tmp_path / "checkpoints").as_uri(),
        "PYTHONPATH": str(TESTS.parent),
    }
    proc = subprocess.run(
        [sys.executable, str(TESTS / "scripts" / "bare_cluster.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # Ray puts the driver's working directory on its workers' sys.path
    )
    report = script_report(proc, "BARE")

    assert set(report["states"].values()) == {"success"}, report["states"]
    for where in (report["where"], report["consume"]["where"]):  # both Ray tasks ran on the bare node
        assert where == {"python": bare_cluster["python"], "airflow_ray": False, "airflow": False}
    expected = float(sum(range(50_000)) + sum(range(100_000)))
    assert report["consume"]["sum"] == expected
    # written by Ray tasks on the bare cluster, under the configured base
    checkpoints = [Path(uri.removeprefix("file://")) for uri in report["checkpoints"]]
    assert all((c / "manifest.json").is_file() for c in checkpoints), report["checkpoints"]
    # after the owner was killed: restored from the checkpoints by Ray tasks on the bare cluster
    assert report["adopted_after_loss"] == 20_000
    assert report["sum_after_loss"] == expected
