"""Checkpointed outputs survive the loss of their owner and of the whole cluster.

Real Airflow (``dag.test``), real Ray, checkpoints on ``file://`` (S3: ``test_checkpoint_s3.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import ray

from airflow_ray.checkpoint import read_checkpoint
from airflow_ray.exceptions import RayObjectLostError
from airflow_ray.owners import forget_owners, get_owner, owner_name
from tests.dags import checkpointed
from tests.helpers import kill_cluster
from tests.s3_server import aws_connection, s3_server  # noqa: F401


def _kill_owner(result) -> None:
    ray.kill(get_owner(owner_name(result.dag_id, result.run_id)), no_restart=True)
    forget_owners()


def _outputs(result) -> tuple:
    return (
        result.xcom("produce", key="array"),
        result.xcom("produce", key="frame"),
        result.xcom("produce_plain"),
    )


def test_owner_loss_restores_from_checkpoint_then_memory(run_dag, tmp_path, caplog):
    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": f"file://{tmp_path}"})
    assert result.state == "success", result.states
    expected = result.xcom("consume")
    assert result.xcom("consume_on_ray") == expected
    ref = result.xcom_raw("produce", key="array")
    assert ref["checkpoint_uri"].startswith(f"file://{tmp_path}/checkpointed/")
    assert ref["checkpoint_uri"].endswith("/produce/-1/array/")
    plain = result.xcom_raw("produce_plain")  # a plain @task, checkpointed via default_args
    assert plain["checkpoint_uri"].endswith("/produce_plain/-1/")

    _kill_owner(result)  # every object of the run is gone with it
    with caplog.at_level("WARNING"):
        outputs = _outputs(result)
    assert checkpointed.digest(*outputs) == expected  # identical data
    assert "Restored the output of task 'produce'" in caplog.text
    assert "Restored the output of task 'produce_plain'" in caplog.text

    # re-registered with the (new) owner: the next read comes from memory, not storage
    owner = get_owner(owner_name(result.dag_id, result.run_id))
    boxed = ray.get(owner.lookup.remote([(result.dag_id, result.run_id, "produce", -1, "array")]))
    assert boxed[0] is not None
    np.testing.assert_array_equal(ray.get(boxed[0][0]), outputs[0])


def test_multiple_outputs_keys_are_sanitised_into_the_task_directory(run_dag, tmp_path):
    """Keys go through the same sanitiser as ids: one safe directory each, inside the task's."""
    result = run_dag(checkpointed.checkpoint_keys_dag, run_conf={"base": f"file://{tmp_path}"})
    assert result.state == "success", result.states
    task_dir = result.xcom_raw("produce", key="named")["checkpoint_uri"].removesuffix("named/")
    for key, size in (("..hidden", 10_000), ("train set:v1", 20_000)):
        uri = result.xcom_raw("produce", key=key)["checkpoint_uri"]
        name = uri.removeprefix(task_dir).removesuffix("/")
        assert uri.startswith(task_dir) and "/" not in name and name != key, uri
        assert not name.startswith(".") and " " not in name and ":" not in name
        np.testing.assert_array_equal(read_checkpoint(uri), np.arange(size))


def test_s3_checkpoints_through_a_dag(run_dag, aws_connection, s3_server):  # noqa: F811 (fixtures)
    """A real S3 endpoint (moto server on loopback), reached through an Airflow aws connection."""
    import json

    result = run_dag(checkpointed.checkpointed_s3_dag)
    assert result.state == "success", result.states
    expected = result.xcom("consume")
    for task_id, key in (("produce", "array"), ("produce", "frame"), ("produce_plain", "return_value")):
        raw = result.xcom_raw(task_id, key=key)
        assert raw["checkpoint_uri"].startswith(f"s3://{s3_server.bucket}/ckpt/checkpointed_s3/")
        assert raw["checkpoint_source"] == aws_connection
        assert s3_server.secret_key not in json.dumps(raw)  # credentials never in XCom
    listed = s3_server.boto3_client().list_objects_v2(Bucket=s3_server.bucket, Prefix="ckpt/checkpointed_s3/")
    names = {item["Key"].rsplit("/", 1)[-1] for item in listed["Contents"]}
    assert {"manifest.json", "data.npy", "data.parquet"} <= names

    _kill_owner(result)
    assert checkpointed.digest(*_outputs(result)) == expected


def test_cluster_loss_then_rerun_of_the_consumers_restores_identical_data(
    run_dag, ray_cluster, tmp_path, monkeypatch
):
    """Run on a private cluster, crash it, re-run only the consumers of the same run on another one.

    The other cluster is the session's head, which never saw the run: the consumers find none of
    its objects and no owner that knows them, as on a fresh cluster (one cold start, not two).
    ``airflow tasks test`` runs one task instance of an existing run through the real task
    runner, in a new process (``dag.test`` would delete the run and start over).
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from airflow_ray import cluster, config

    # A private embedded cluster for the first run, so the session's head is not the one stopped.
    monkeypatch.setenv("AIRFLOW__RAY__LOCAL_CLUSTER_DIR", str(tmp_path / "cluster"))
    monkeypatch.setenv("AIRFLOW__RAY__LOCAL_CLUSTER_DASHBOARD", "False")  # starts twice as fast
    monkeypatch.setenv("AIRFLOW__RAY__LOCAL_CLUSTER_KEEPER", "False")  # and faster without a keeper
    config.clear_caches()
    ray.shutdown()  # the next task connects anew, to the private cluster
    try:
        first = run_dag(checkpointed.checkpointed_dag, run_conf={"base": f"file://{tmp_path}"})
        assert first.state == "success", first.states
        private = cluster.current()
        assert private is not None and private.address != ray_cluster.address
        expected = first.xcom("consume")
        # The cluster crashes (SIGKILL): every object of the run is gone with it. This process,
        # one of its drivers, leaves first: a driver whose GCS dies exits.
        ray.shutdown()
        kill_cluster(private.temp_dir, private.address)
        assert cluster.current() is None
    finally:
        cluster.stop()
        monkeypatch.undo()
        config.clear_caches()
    assert cluster.current() == ray_cluster  # from here on the embedded cluster is the session's

    for consumer in ("consume", "consume_on_ray"):
        with create_session() as session:  # the re-run must write its own result
            session.query(XComModel).filter_by(run_id=first.run_id, task_id=consumer).delete()
        proc = subprocess.run(
            [sys.executable, "-m", "airflow", "tasks", "test", "checkpointed", consumer, first.run_id],
            env=os.environ,
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-5000:]
        assert f"Connected to Ray at {ray_cluster.address}" in output, output[-5000:]
        # The first re-run restores from the checkpoints and re-registers the objects with the
        # session cluster's owner; the second reads them from memory again.
        restored = "Restored the output of task 'produce'" in output
        assert restored == (consumer == "consume"), output[-5000:]
        assert first.xcom(consumer) == expected  # identical data, hash for hash


def test_corrupt_checkpoint_is_an_error_naming_the_path(run_dag, tmp_path):
    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": f"file://{tmp_path}"})
    assert result.state == "success", result.states
    uri = result.xcom_raw("produce", key="array")["checkpoint_uri"]
    data = next((tmp_path / uri.removeprefix(f"file://{tmp_path}/")).glob("data.*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    _kill_owner(result)
    with pytest.raises(RayObjectLostError, match="restoring it from its checkpoint") as excinfo:
        result.xcom("produce", key="array")
    assert str(data.parent) in str(excinfo.value)


def test_gc_deletes_checkpoints_of_deleted_and_expired_runs(run_dag, tmp_path):
    import functools
    import shutil
    import time

    from airflow_ray import retention

    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": f"file://{tmp_path}"})
    assert result.state == "success", result.states
    run_dir = next((tmp_path / "checkpointed").iterdir())
    gone = run_dir.with_name("manual__a_deleted_run")  # checkpoints of a run no longer in the DB
    shutil.copytree(run_dir, gone)
    base = f"file://{tmp_path}"

    expire = functools.partial(retention.expire_checkpoints, base, retention_seconds=3600, grace_seconds=0)
    assert expire(dry_run=True) == {"kept": 1, "deleted": 1, "failed": 0}
    assert gone.exists()
    assert expire() == {"kept": 1, "deleted": 1, "failed": 0}
    assert run_dir.exists() and not gone.exists()
    later = time.time() + 7200  # the live run's checkpoints expire after the retention period
    assert expire(now=later) == {"kept": 0, "deleted": 1, "failed": 0}
    assert not run_dir.exists()
