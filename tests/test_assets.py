"""Checkpointed outputs as Airflow Assets (``airflow_ray.assets``), with ``dag.test()``.

That a DAG scheduled on such an asset runs when it is updated needs a real scheduler: see
``test_checkpoint_asset_schedules_a_downstream_dag`` in tests/test_local_executor.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from airflow_ray.assets import CheckpointAsset, record
from tests.dags import assets as dags


def _events(asset: CheckpointAsset, dag_id: str, run_id: str) -> list[dict]:
    """The extras of the asset events ``run_id`` of ``dag_id`` recorded for ``asset``."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = (
            session.query(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .filter(AssetModel.uri == asset.uri, AssetEvent.source_dag_id == dag_id)
            .filter(AssetEvent.source_run_id == run_id)
            .all()
        )
        return [dict(row.extra) for row in rows]


def _manifest(uri: str) -> dict:
    return json.loads((Path(urlsplit(uri).path) / "manifest.json").read_text())


def test_checkpoint_assets_record_events_describing_the_checkpoint(run_dag):
    result = run_dag(dags.asset_producer_dag)
    assert result.state == "success", result.states

    (features,) = _events(dags.features, "asset_producer", result.run_id)
    reference = result.xcom_raw("make_features")
    manifest = _manifest(features["uri"])
    assert features == {
        "key": "return_value",
        "uri": reference["checkpoint_uri"],
        "format": "parquet",
        "rows": 1000,
        "bytes": manifest["bytes"],
        "digest": reference["checkpoint_digest"],
        "python_type": "pandas.DataFrame",
    }
    assert features["uri"].startswith(dags.features.uri + "/asset_producer/")
    assert manifest["checksum"] == features["digest"]

    # A plain task's small output is checkpointed too (not left in the XCom table): the asset needs it.
    (scores,) = _events(dags.scores, "asset_producer", result.run_id)
    assert result.xcom_raw("score")["checkpoint_uri"] == scores["uri"]
    assert scores["format"] == "pickle" and scores["rows"] == 1 and scores["bytes"] > 0  # a 1-item list


def test_checkpoint_asset_on_a_task_without_checkpoint_is_refused_at_parse_time():
    from airflow.sdk import DAG

    from airflow_ray import ray_task

    with DAG("asset_no_checkpoint", schedule=None), pytest.raises(ValueError) as info:

        @ray_task(outlets=[dags.features])
        def forgot() -> int:
            return 1

        forgot()
    assert "'forgot' declares the checkpoint asset(s)" in str(info.value)
    assert "checkpoint=True and checkpoint_path=<the asset's URI>" in str(info.value)


def test_checkpoint_outside_the_asset_fails_before_writing(run_dag, capfd):
    result = run_dag(dags.asset_elsewhere_dag)
    text = "".join(capfd.readouterr())
    assert result.states == {"misplaced": "failed"}
    assert f"declares the checkpoint asset {dags.features.uri!r}, but its checkpoint goes to" in text
    assert f"Give the task checkpoint_path={dags.features.uri!r}" in text
    assert not Path(urlsplit(dags.BASE).path, "not-features", "asset_elsewhere", result.run_id).exists()
    assert _events(dags.features, "asset_elsewhere", result.run_id) == []


def test_plain_task_with_a_checkpoint_asset_but_no_checkpoint_fails(run_dag, capfd):
    result = run_dag(dags.asset_unchecked_dag)
    text = "".join(capfd.readouterr())
    assert result.states == {"unchecked": "failed"}
    assert "'unchecked' declares the checkpoint asset(s)" in text
    assert "default_args={'checkpoint': True, 'checkpoint_path': ...}" in text


def test_checkpoint_asset_needs_the_ray_xcom_backend(run_dag, default_xcom, capfd):
    result = run_dag(dags.asset_producer_dag)
    text = "".join(capfd.readouterr())
    assert result.states["make_features"] == "failed"
    assert "only outputs kept in Ray's object store are checkpointed" in text
    assert "AIRFLOW__CORE__XCOM_BACKEND=airflow_ray.xcom.RayXComBackend" in text


def test_multiple_outputs_pushed_one_by_one_accumulate_in_one_event():
    """A plain ``multiple_outputs`` task checkpoints each key as Airflow pushes it."""
    from airflow.sdk.execution_time.context import OutletEventAccessors

    events = OutletEventAccessors()
    facts = {"format": "npy", "rows": None, "digest": "xxh3_128:0"}
    record([dags.scores], events, {"a": {"key": "a", "bytes": 10, **facts}})
    assert events[dags.scores].extra == {"key": "a", "bytes": 10, **facts}
    record([dags.scores], events, {"b": {"key": "b", "bytes": 5, **facts}})
    assert events[dags.scores].extra == {
        "outputs": {"a": {"key": "a", "bytes": 10, **facts}, "b": {"key": "b", "bytes": 5, **facts}},
        "bytes": 15,
    }
