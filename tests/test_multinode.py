"""Multi-node: custom resources pin tasks to a node; outputs survive the loss of that node.

The cluster is a real ``ray.cluster_utils.Cluster`` (a head and a worker node with the resource
``special``, each with its own raylet and object store), started in a subprocess together with
the DAG run, so the pytest process stays a driver of the session's cluster only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers import script_report

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "multinode.py"

pytestmark = pytest.mark.slow


def test_custom_resources_and_node_loss_on_a_multi_node_cluster():
    # Ray's unix socket paths must stay short: a temp dir near the root, not pytest's tmp_path.
    temp_dir = tempfile.mkdtemp(prefix="arm_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), temp_dir],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=540,
        )
    finally:
        _kill_leftovers(temp_dir)
    report = script_report(proc, "MULTINODE")
    shutil.rmtree(temp_dir, ignore_errors=True)  # kept for its logs when the run failed

    assert report["source"] == "environment variable RAY_ADDRESS"
    assert report["state"] == "success", report["states"]
    assert report["head_node_id"] != report["special_node_id"]
    assert report["where"] == report["special_node_id"]  # resources={"special": 1}
    assert report["anywhere"] in (report["head_node_id"], report["special_node_id"])
    # The cluster demands a token (its nodes started with RAY_AUTH_MODE=token); the driver's
    # environment does not say so, and the hook turns token mode on because the local token
    # file exists.
    assert report["auth_mode_before"] is None
    assert "RayAuthenticationError" in report["auth"]["no_token"], report["auth"]
    assert "authentication failed" in report["auth"]["no_token"]
    assert report["auth"]["token_file"] == "ok"
    assert report["hook_auth_mode"] == "token"

    # Node loss: the output of a retriable task is recomputed by Ray (lineage); one whose task
    # cannot be retried (max_retries=0) is restored from its checkpoint, by both consumers.
    loss = report["node_loss"]
    assert loss["state"] == "success", loss["states"]
    expected = [float(sum(range(3_000_000))), float(2 * sum(range(3_000_000)))]
    assert loss["on_ray"] == loss["in_airflow"] == expected
    assert loss["restored"] and all("'produce_checkpointed'" in line for line in loss["restored"])


def _kill_leftovers(temp_dir: str) -> None:
    """The script shuts its cluster down; if it died first, stop what still names its temp dir."""
    import psutil

    leftovers = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for proc in leftovers:
        proc.kill()
    psutil.wait_procs(leftovers, timeout=10)
