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
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TESTS
from tests.helpers import loopback_head, script_report

pytestmark = pytest.mark.slow

#: What a Ray cluster for airflow-ray needs (docs/deploy: "the cluster side"), at this suite's versions.
CLUSTER_PACKAGES = ("ray", "numpy", "pandas", "pyarrow", "fsspec", "xxhash")


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory):
    """``ray start --head`` from a virtualenv without airflow-ray; yields its GCS address."""
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

    resources = ["--num-cpus=2", "--resources=" + json.dumps({"bare": 2})]
    with loopback_head(str(venv / "bin" / "ray"), extra_args=resources, cwd=str(venv)) as address:
        yield {"address": address, "python": str(python)}


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
