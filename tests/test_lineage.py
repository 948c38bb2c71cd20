"""OpenLineage events for Ray tasks (``airflow_ray.lineage``), as the real listener writes them.

The provider's listener is registered when Airflow loads its plugins, and only if a transport is
configured, so the DAG runs in its own process (``airflow dags test``, own ``AIRFLOW_HOME``) with
OpenLineage's file transport; the events on disk are parsed and checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import TESTS, new_airflow_home

NAMESPACE = "airflow-ray-tests"


@pytest.fixture(scope="module")
def events(ray_cluster, tmp_path_factory) -> list[dict]:
    """Every OpenLineage event of one run of ``tests/dags/lineage.py``."""
    home = new_airflow_home(tmp_path_factory.mktemp("lineage-home"))
    events_file = home / "openlineage.jsonl"
    base = (home / "checkpoints").as_uri()
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "PYTHONPATH": str(TESTS.parent),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(
            {"type": "file", "log_file_path": str(events_file), "append": True}
        ),
        "AIRFLOW__OPENLINEAGE__NAMESPACE": NAMESPACE,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "lineage", "-c", json.dumps({"base": base})],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=home,  # Ray puts the driver's working directory on its workers' sys.path
    )
    assert proc.returncode == 0 and events_file.exists(), f"{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return [json.loads(line) for line in events_file.read_text().splitlines() if line.strip()]


def _event(events: list[dict], task_id: str, event_type: str) -> dict:
    (event,) = [
        e for e in events if e["job"]["name"] == f"lineage.{task_id}" and e["eventType"] == event_type
    ]
    return event


def test_ray_task_events_carry_the_ray_run_facet(events):
    start = _event(events, "features", "START")
    assert start["run"]["facets"]["ray"]["resources"] == {"num_cpus": 0.5, "memory": 64 * 1024**2}

    complete = _event(events, "features", "COMPLETE")
    assert complete["job"]["namespace"] == NAMESPACE
    ray_facet = complete["run"]["facets"]["ray"]
    assert ray_facet["kind"] == "task" and ray_facet["owner"].startswith("airflow_ray_owner")
    assert len(ray_facet["nodeId"]) == 56  # a Ray node id (hex)
    assert ray_facet["dashboardUrl"].startswith("http://127.0.0.1:")
    assert ray_facet["pageUrl"].startswith(ray_facet["dashboardUrl"] + "/#/actors/")
    (output,) = ray_facet["outputs"]
    assert output["key"] == "return_value" and output["rows"] == 500 and output["bytes"] > 0
    assert len(output["objectId"]) > 20
    assert ray_facet["_schemaURL"].endswith("#RayRunFacet")


def test_checkpoints_are_the_datasets_written_and_read(events):
    (written,) = _event(events, "features", "COMPLETE")["outputs"]
    assert written["namespace"] == "file"
    assert "/checkpoints/lineage/" in written["name"] and written["name"].endswith("/features/-1")
    assert written["outputFacets"]["outputStatistics"]["rowCount"] == 500
    assert written["facets"]["version"]["datasetVersion"].startswith("xxh3_128:")

    total = _event(events, "total", "COMPLETE")
    assert [(d["namespace"], d["name"]) for d in total["inputs"]] == [(written["namespace"], written["name"])]
    assert total["outputs"] == []  # not checkpointed: its small output stays in the XCom table
    assert total["run"]["facets"]["ray"]["outputs"][0]["inline"] is True


def test_ray_job_events_carry_the_job(events):
    ray_facet = _event(events, "job", "COMPLETE")["run"]["facets"]["ray"]
    assert ray_facet["kind"] == "job"
    assert ray_facet["jobId"].startswith("airflow-lineage.job.")
    assert ray_facet["resources"] == {"entrypoint_num_cpus": 0.1}
    assert ray_facet["pageUrl"] == f"{ray_facet['dashboardUrl']}/#/jobs/{ray_facet['jobId']}"
    assert len(ray_facet["nodeId"]) == 56  # the driver's node


def test_operator_modules_import_without_the_openlineage_provider():
    """``pip install airflow-ray`` without the extra: the operators import and build without
    OpenLineage. The provider's package stays importable for Airflow's provider discovery (an
    installed distribution is discovered through its metadata); everything else is blocked."""
    code = """
import sys
DISCOVERY = {"airflow.providers.openlineage", "airflow.providers.openlineage.get_provider_info"}
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "openlineage" or (
            name.startswith("airflow.providers.openlineage.") and name not in DISCOVERY
        ):
            raise ImportError(f"blocked: {name}")
sys.meta_path.insert(0, Block())
from airflow.sdk import DAG
from airflow_ray import ray_task
from airflow_ray.operators import RaySubmitJobOperator
with DAG("no_openlineage", schedule=None):
    ray_task(task_id="one")(lambda: 1)()
    RaySubmitJobOperator(task_id="job", entrypoint="true")
loaded = [m for m in sys.modules if "openlineage" in m and m not in DISCOVERY]
assert not loaded, loaded
print("OK")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "OK", proc.stderr[-3000:]
