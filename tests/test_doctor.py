"""``airflow-ray doctor --connection ID`` against real clusters: the session's head (every check
ok), a wrong token and an unreachable address. The version-skewed cluster is in
``tests/test_version_skew.py``; a production-shaped cluster (an Airflow worker host checking a
remote multi-node cluster, through both connections, with a wrong token and a killed node) in
``tests/test_topology.py``.

Each doctor runs as the real command in its own process: it becomes a driver of the cluster it
checks, and Ray caches the token per process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_ray import cluster
from airflow_ray.doctor import CLUSTER_CHECKS
from tests.helpers import doctor_verdicts

ROOT = Path(__file__).resolve().parents[1]


def _doctor(*args: str, conn: dict | None = None, **env: str) -> subprocess.Popen:
    """Start ``airflow-ray doctor --connection ray_doctor ARGS`` in a fresh process."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIRFLOW_CONN_"))}
    environ["PYTHONPATH"] = str(ROOT)
    if conn is not None:
        environ["AIRFLOW_CONN_RAY_DOCTOR"] = json.dumps({"conn_type": "ray", **conn})
    return subprocess.Popen(
        [sys.executable, "-m", "airflow_ray.cli", "doctor", "--connection", "ray_doctor", *args],
        env={**environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _verdicts(proc: subprocess.Popen) -> tuple[int, dict[str, tuple[str, str]]]:
    stdout, stderr = proc.communicate(timeout=300)
    return proc.returncode, doctor_verdicts(stdout, stderr)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_session_cluster_all_ok_wrong_token_and_unreachable(ray_cluster, tmp_path, closed_port):
    """Three doctors at once against the session's head: right token, wrong token, closed port."""
    token = cluster.ensure_token().read_text().strip()
    base = tmp_path / "checkpoints"
    right = {
        "host": ray_cluster.address,
        "password": token,
        "extra": {"dashboard_url": ray_cluster.dashboard_url},
    }
    procs = {
        "ok": _doctor("--checkpoint-path", base.as_uri(), conn=right),
        "wrong_token": _doctor(conn={"host": ray_cluster.address, "password": "0" * len(token)}),
        "unreachable": _doctor(conn={"host": f"127.0.0.1:{closed_port}"}),
    }
    results = {case: _verdicts(proc) for case, proc in procs.items()}

    status, verdicts = results["ok"]
    assert status == 0, verdicts
    assert {name: v[0] for name, v in verdicts.items()} == dict.fromkeys(verdicts, "ok"), verdicts
    assert verdicts["token"][1] == "accepted (sent: the password of Airflow connection 'ray_doctor')"
    assert verdicts["owners"][1].endswith("the keeper's owner factory is running (warm Ray workers)")
    assert verdicts["dashboard"][1].startswith(f"the Jobs API at {ray_cluster.dashboard_url} ")
    assert "a probe object written and deleted" in verdicts["checkpoints"][1]
    assert [p.name for p in base.iterdir()] == []  # the probe is gone, and no marker was claimed

    status, verdicts = results["wrong_token"]
    assert status == 1
    assert verdicts["reachable"][0] == "ok"
    assert verdicts["token"][0] == "FAILED"
    assert "token sent: the password of Airflow connection 'ray_doctor'" in verdicts["token"][1]
    assert "Put the cluster's token (`ray get-auth-token` on the head node)" in verdicts["token"][1]
    assert all(verdicts[name][0] == "skipped" for name in CLUSTER_CHECKS[3:])

    status, verdicts = results["unreachable"]
    assert status == 1
    assert verdicts["address"][0] == "ok"
    assert verdicts["reachable"][0] == "FAILED"
    assert verdicts["reachable"][1].startswith(
        f"Ray cluster unreachable at 127.0.0.1:{closed_port} (from Airflow connection 'ray_doctor')"
    )
    assert all(verdicts[name][0] == "skipped" for name in CLUSTER_CHECKS[2:])


def test_checkpoint_base_of_another_deployment_fails(tmp_path):
    """The base marker's rule: a base another deployment claimed is refused before any probe."""
    from airflow_ray.checkpoint import claim_base

    base = (tmp_path / "theirs").as_uri()
    claim_base(base, {}, "someone-else")
    status, verdicts = _verdicts(
        _doctor("--checkpoint-path", base, conn={"host": "127.0.0.1:1", "extra": {"dashboard_url": ""}})
    )
    assert status == 1
    assert verdicts["checkpoints"][0] == "FAILED"
    assert "belongs to the Airflow deployment 'someone-else'" in verdicts["checkpoints"][1]
