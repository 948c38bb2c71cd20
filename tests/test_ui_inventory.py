"""What the Ray view shows (``airflow_ray.ui.inventory``), from real runs (``dag.test()``) on real Ray.

The routes, their permission checks and the page in a browser are tested against the real API
server in tests/test_ui.py; these are the data behind them, checked where a fixture can break it
(a rewritten checkpoint manifest, a forged XCom row) in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from airflow_ray.ui import inventory
from tests.dags import assets as dags


@pytest.fixture(scope="module")
def produced(ray_cluster):
    """One run of ``asset_producer``: a checkpointed DataFrame (Ray task) and a checkpointed list
    (plain task, adopted by the owner because its asset needs a checkpoint)."""
    from tests.helpers import run_dag

    result = run_dag(dags.asset_producer_dag)
    assert result.state == "success", result.states
    return result


def _rows(report: dict) -> dict[str, dict]:
    return {row["task_id"]: row for row in report["outputs"]}


def test_a_runs_outputs_with_nodes_and_verified_checkpoints(produced):
    report = inventory.run_outputs(produced.dag_id, produced.run_id)
    rows = _rows(report)
    features = rows["make_features"]
    assert features["where"] == inventory.IN_STORE
    assert features["type"].endswith("DataFrame") and features["rows"] == 1000 and features["bytes"] > 0
    assert features["node_address"] == inventory.OWNER_MEMORY  # 16 KB: kept by the owner (large: a node)
    assert features["checkpoint"] == "verified", features.get("checkpoint_problem")
    assert features["checkpoint_uri"] == produced.xcom_raw("make_features")["checkpoint_uri"]
    assert rows["score"]["where"] == inventory.IN_STORE and rows["score"]["checkpoint"] == "verified"
    totals = report["totals"]
    assert totals["object_store"] == 2 and totals["checkpoints_verified"] == totals["checkpointed"] == 2
    assert totals["object_store_bytes"] == features["bytes"] + rows["score"]["bytes"]


def test_a_rewritten_manifest_is_not_verified(run_dag):
    result = run_dag(dags.asset_producer_dag)
    manifest = Path(urlsplit(result.xcom_raw("make_features")["checkpoint_uri"]).path) / "manifest.json"
    data = json.loads(manifest.read_text())
    data["checksum"] = "xxh3_128:" + "0" * 32
    manifest.write_text(json.dumps(data))
    features = _rows(inventory.run_outputs(result.dag_id, result.run_id))["make_features"]
    assert features["checkpoint"] == "mismatch"
    assert "not the one that was written" in features["checkpoint_problem"]


def test_a_forged_row_is_shown_untrusted_and_never_freed(produced):
    """A row edited through the REST API names another object: listed as untrusted, with why,
    and freeing the run leaves its object alone."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    forged = {**produced.xcom_raw("make_features"), "task_id": "forged"}
    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(
                dag_id=produced.dag_id, run_id=produced.run_id, task_id="make_features", key="return_value"
            )
            .one()
        )
        columns = {c.name: getattr(row, c.name) for c in XComModel.__table__.columns}
        session.query(XComModel).filter_by(
            dag_id=produced.dag_id, run_id=produced.run_id, task_id="make_features", key="return_value"
        ).update({"value": forged})
    try:
        rows = _rows(inventory.run_outputs(produced.dag_id, produced.run_id))
        assert rows["make_features"]["where"] == inventory.UNTRUSTED
        assert "valid signature" in rows["make_features"]["problem"]
        freed = inventory.free_run(produced.dag_id, produced.run_id)
        assert freed["untrusted"] == 1 and freed["freed_objects"] == 1  # score's object only
    finally:
        with create_session() as session:
            session.query(XComModel).filter_by(
                dag_id=produced.dag_id, run_id=produced.run_id, task_id="make_features", key="return_value"
            ).update({"value": columns["value"]})
    assert _rows(inventory.run_outputs(produced.dag_id, produced.run_id))["make_features"]["where"] == (
        inventory.IN_STORE
    )


def test_freeing_a_run_frees_its_objects_and_the_chart_drops_it(run_dag):
    result = run_dag(dags.asset_producer_dag)
    run = (result.dag_id, result.run_id)

    def chart_bytes() -> int:
        runs = inventory.cluster(lambda dag_id: True)["runs"]
        return sum(r["bytes"] for r in runs if (r["dag_id"], r["run_id"]) == run)

    held = inventory.run_outputs(*run)["totals"]["object_store_bytes"]
    assert chart_bytes() == held > 0
    freed = inventory.free_run(*run)
    assert freed["freed_objects"] == 2 and freed["freed_bytes"] == held
    after = inventory.run_outputs(*run)
    assert {row["where"] for row in after["outputs"]} == {inventory.NOT_HELD}
    assert after["totals"]["object_store_bytes"] == 0 and chart_bytes() == 0
    assert inventory.free_run(*run)["freed_objects"] == 0  # nothing left: says so, does not fail


def test_the_cluster_lists_nodes_store_owners_and_only_readable_runs(produced):
    cluster = inventory.cluster(lambda dag_id: dag_id != produced.dag_id)
    assert cluster["nodes"] and all(n["alive"] and n["cpus"] > 0 for n in cluster["nodes"])
    store = cluster["object_store"]
    assert store["capacity_bytes"] > 0 and store["used_bytes"] >= 0 and "spilled_bytes" in store
    assert cluster["owners"] and all(o["healthy"] for o in cluster["owners"])
    assert all(r["dag_id"] != produced.dag_id for r in cluster["runs"])  # not readable: not listed


def test_an_unknown_run_is_named():
    with pytest.raises(inventory.RunNotFoundError, match="DAG 'asset_producer' has no run 'nope'"):
        inventory.run_outputs("asset_producer", "nope")
