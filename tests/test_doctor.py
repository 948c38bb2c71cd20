"""``airflow-ray doctor --connection ID`` against real clusters: the session's head (every check
ok), a wrong token, an unreachable address, and a two-node cluster whose worker node was killed.
(The version-skewed cluster is in ``tests/test_version_skew.py``.)

Each doctor runs as the real command in its own process: it becomes a driver of the cluster it
checks, and Ray caches the token per process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from airflow_ray import cluster
from airflow_ray.doctor import CLUSTER_CHECKS
from tests.helpers import kill_cluster

ROOT = Path(__file__).resolve().parents[1]
ALL_CHECKS = [*CLUSTER_CHECKS, "dashboard", "checkpoints"]


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
    """Exit status and ``{check: (status, detail)}``: one line per check, in the documented order
    (Airflow's log lines, e.g. the hook's "Connected to Ray", may come between them)."""
    stdout, stderr = proc.communicate(timeout=300)
    statuses = ("ok", "warn", "FAILED", "skipped")
    lines = [line.split(maxsplit=1) for line in stdout.splitlines() if line.startswith(statuses)]
    verdicts = {}
    for status, rest in lines:
        name = next((n for n in ALL_CHECKS if rest.startswith(n)), None)
        assert name is not None, stdout
        verdicts[name] = (status, rest[len(name) :].strip())
    assert list(verdicts) == ALL_CHECKS, f"{stdout}\n{stderr[-3000:]}"
    return proc.returncode, verdicts


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
    assert {name: v[0] for name, v in verdicts.items()} == dict.fromkeys(ALL_CHECKS, "ok"), verdicts
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


@pytest.fixture
def two_nodes():
    """A head and a worker node (``ray start``, this suite's Ray, loopback); the worker is killed
    by the test. Nodes are declared dead after ~1.5 s of missed health checks, not Ray's ~30 s."""
    from tests.s3_server import _free_port

    head_dir = tempfile.mkdtemp(prefix="ardh-", dir="/tmp")  # short: Ray's socket paths
    worker_dir = tempfile.mkdtemp(prefix="ardw-", dir="/tmp")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",  # both nodes use the local token file, as `ray start --head` does
        RAY_health_check_period_ms="500",
        RAY_health_check_failure_threshold="3",
        RAY_health_check_initial_delay_ms="0",
    )
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts", "start", "--node-ip-address=127.0.0.1"]
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    head = ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={head_dir}"]
    worker = [f"--address=127.0.0.1:{port}", f"--temp-dir={worker_dir}"]
    try:
        for args, where in ((head, head_dir), (worker, worker_dir)):
            agent = f"--dashboard-agent-listen-port={_free_port()}"
            subprocess.run(
                [*ray_cli, *args, *common, agent], env=env, check=True, capture_output=True, cwd=where
            )
        yield {"address": f"127.0.0.1:{port}", "worker_dir": worker_dir}
    finally:
        kill_cluster(worker_dir, "-")
        kill_cluster(head_dir, f"127.0.0.1:{port}")  # never `ray stop`: it kills every cluster
        shutil.rmtree(head_dir, ignore_errors=True)
        shutil.rmtree(worker_dir, ignore_errors=True)


#: Waits until the head has declared the killed node dead, then runs the doctor (one process).
_WAIT_THEN_DOCTOR = """
import sys, time
from airflow_ray import cli, compat
compat.apply_env({"RAY_AUTH_MODE": "token"})
deadline = time.monotonic() + 60
while compat.cluster_status(sys.argv[1])["nodes"] > 1 and time.monotonic() < deadline:
    time.sleep(0.5)
sys.exit(cli.main(["doctor", "--connection", "ray_doctor"]))
"""


@pytest.mark.slow
def test_a_killed_worker_node_is_reported(two_nodes):
    kill_cluster(two_nodes["worker_dir"], "-")  # the raylet and its object store die, as in a crash
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIRFLOW_CONN_"))}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WAIT_THEN_DOCTOR, two_nodes["address"]],
        env={
            **environ,
            "PYTHONPATH": str(ROOT),
            "AIRFLOW_CONN_RAY_DOCTOR": json.dumps({"conn_type": "ray", "host": two_nodes["address"]}),
        },
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    status, verdicts = _verdicts(proc)
    assert status == 1
    assert [verdicts[name][0] for name in CLUSTER_CHECKS[:5]] == ["ok"] * 5, verdicts
    state, detail = verdicts["nodes"]
    assert state == "FAILED"
    assert detail.startswith("1 of 2 nodes died unexpectedly: ")
    assert "(UNEXPECTED_TERMINATION: " in detail
    assert "Restart the node" in detail
    assert verdicts["owners"][0] == "warn"  # no keeper on a cluster airflow-ray did not start
    assert "no keeper" in verdicts["owners"][1]
