"""Checkpointed outputs survive the loss of their owner.

Real Airflow (``dag.test``), real Ray, checkpoints on ``file://`` and S3. The loss of the whole
cluster (killed and started again, consumers re-run in new task processes on another Airflow
host) is ``tests/test_topology.py``'s last test: one cluster restart there instead of a second
cold cluster start here (CI time).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import ray

from airflow_ray.checkpoint import read_checkpoint
from airflow_ray.exceptions import RayObjectLostError
from airflow_ray.owners import forget_owners, get_owner, owner_name
from tests.dags import checkpointed
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


def test_checkpoints_are_written_by_the_owners_ray_job(run_dag, ray_cluster, tmp_path):
    """The writes are tasks of the run's owner's Ray job (warm workers), none of the task
    process's own (a task process is a Ray job of its own: its first task starts a new worker).
    The session's owners are the keeper's factory's, in the keeper's job; this process's job is
    another. Ray reports a process's task events in order, in batches: once a marker task
    submitted afterwards is listed, any write submitted from here would be too."""
    from ray.util.state import list_actors, list_tasks

    from airflow_ray.hooks import RayHook
    from tests.services import wait

    RayHook().connect()  # the state API wants the cluster's token, which connecting loads
    api, here = ray_cluster.dashboard_url, ray.get_runtime_context().get_job_id()

    def writes_by_job() -> Counter[str]:
        tasks = list_tasks(
            api, filters=[("name", "=", "write_checkpoint")], limit=10_000, raise_on_missing_output=False
        )
        return Counter(t.job_id for t in tasks)

    before = writes_by_job()
    result = run_dag(checkpointed.checkpoint_keys_dag, run_conf={"base": tmp_path.as_uri()})
    assert result.state == "success", result.states
    name = owner_name(result.dag_id, result.run_id)
    (owner,) = list_actors(api, filters=[("name", "=", name), ("state", "=", "ALIVE")])
    assert owner.job_id != here

    def new_writes(job: str) -> int:
        return writes_by_job()[job] - before[job]

    wait(
        lambda: new_writes(owner.job_id) >= 3, "the owner's three checkpoint writes in Ray's task events", 30
    )
    marker = "airflow-ray-tests-events-flushed"
    ray.get(ray.remote(lambda: None).options(name=marker, num_cpus=0).remote())
    wait(
        lambda: list_tasks(api, filters=[("name", "=", marker), ("job_id", "=", here)]),
        "the marker task's event",
        30,
    )
    assert new_writes(here) == 0


def test_an_owner_gone_before_the_checkpoint_is_a_clear_error(ray_cluster, tmp_path):
    """The outputs' owner died between the function's run and the checkpoint (killed, or its node
    lost): the task fails naming the owner and what to do, not with Ray's raw actor error, and
    nothing is written."""
    import logging

    from airflow_ray import outputs, tasks
    from airflow_ray._worker.keys import TaskKey
    from airflow_ray.hooks import RayHook

    RayHook().connect()
    key = TaskKey("owner_gone", "run", "produce", -1)
    request = tasks.TaskRequest(fn=np.arange, args=(1000,), kwargs={}, task_key=key, inline_limit=0)
    reply = tasks.run(request, logging.getLogger(__name__))
    ray.kill(get_owner(owner_name(key.dag_id, key.run_id)), no_restart=True)
    settings = outputs.CheckpointSettings(path=tmp_path.as_uri())
    lost = r"lost before they were checkpointed: their owner actor 'airflow_ray_owner-[^']+' is gone"
    with pytest.raises(RayObjectLostError, match=lost):
        outputs.publish(key, reply, ray_conn_id="ray_default", checkpoint=settings, multiple_outputs=False)
    assert not list(tmp_path.rglob("manifest.json"))


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
