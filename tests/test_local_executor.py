"""Cross-process hand-off under a real scheduler + LocalExecutor (each task its own process).

``dag.test()`` runs every task in the test process, so it cannot show that objects outlive
the process that produced them. Here the api-server, scheduler and dag-processor run as
real services on loopback (``tests/services.py``), each task instance is its own short-lived
process, and the Ray objects must survive their producers' exit.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray

pytestmark = pytest.mark.slow


def test_objects_outlive_their_producers(airflow_services):
    from airflow_ray.hooks import RayHook
    from airflow_ray.store import get_owner, owner_name

    airflow_services.trigger("cross_process", "xp1")
    airflow_services.wait_for_run("cross_process", "xp1")
    result = airflow_services.xcom("cross_process", "xp1", "consume")
    assert result["sum"] == float(2 * np.arange(2_000_000, dtype=np.float64).sum())
    assert result["producer_pid"] != result["consumer_pid"] != os.getpid()  # separate processes
    raw = airflow_services.xcom("cross_process", "xp1", "produce", key="data")
    assert raw["__airflow_ray__"] == 1 and len(json.dumps(raw)) <= 1024

    RayHook().connect()
    owner = get_owner(owner_name("cross_process", "xp1"))
    held = {e["object_id"] for e in ray.get(owner.entries.remote()) if e["key"][1] == "xp1"}
    assert raw["object_id"] in held, "the owner holds the run's objects after every producer exited"
