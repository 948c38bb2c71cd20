"""A Ray cluster needs Ray, not airflow-ray: everything Ray-side runs from a virtualenv without it.

The cluster here (the ``bare_cluster`` fixture of tests/conftest.py, shared with
tests/test_keeper.py) is started from a second virtualenv that has the same Ray release and the
data libraries (numpy, pandas, pyarrow, fsspec, xxhash) but neither Airflow nor airflow-ray, so every
process on it (owner actors, ``@ray_task`` workers, checkpoint writes and restores) runs only
what :mod:`airflow_ray._worker` shipped by value. Its node alone has the custom resource ``bare``
that the test DAG's Ray tasks ask for. The Airflow side (the driver) is this suite's virtualenv.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TESTS
from tests.helpers import script_report

pytestmark = pytest.mark.slow


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
