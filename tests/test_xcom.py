"""RayXComBackend on a real Airflow 3 and a real Ray head (dag.test: one process)."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray

from airflow_ray import outputs, tasks
from airflow_ray.exceptions import RayObjectLostError
from airflow_ray.owners import forget_owners, get_owner, owner_name
from airflow_ray.references import REFERENCE_FORMAT_VERSION, ObjectHandle
from tests.dags import handoff


def test_every_type_through_both_kinds_of_consumer(run_dag):
    result = run_dag(handoff.types_dag)
    assert result.state == "success", result.states
    for consumer in ("check_on_ray", "check_on_ray__1", "check_in_airflow", "check_in_airflow__1"):
        assert result.xcom(consumer) == dict.fromkeys(
            ("array", "frame", "table", "nested", "model", "booster"), True
        ), consumer
    for producer in ("produce_on_ray", "produce_in_airflow"):
        for key in ("array", "frame", "table", "model", "booster"):
            raw = result.xcom_raw(producer, key=key)
            assert raw["__airflow_ray__"] == REFERENCE_FORMAT_VERSION and raw["key"] == key, (producer, key)
            assert len(json.dumps(raw)) <= 1024  # a small readable reference, never pickled bytes
        frame = result.xcom_raw(producer, key="frame")["summary"]
        assert (frame["rows"], frame["columns"]) == (5000, 3)
    # a plain multiple_outputs task: the whole dict refers to the per-key objects, not a copy
    whole = result.xcom_raw("produce_in_airflow")["__airflow_ray_outputs__"]
    assert whole["array"]["object_id"] == result.xcom_raw("produce_in_airflow", key="array")["object_id"]
    assert whole["nested"] == result.xcom_raw("produce_in_airflow", key="nested")  # small: inline
    assert result.xcom("produce_in_airflow")["nested"] == {"a": [1, 2, {"b": (3, 4)}], "c": None}


def test_ray_data_datasets_outlive_their_producer(run_dag):
    """A Dataset output is materialized and its blocks owned by the owner: the Ray worker
    that ran it is killed before the consumers read it; a plain task's dataset is adopted."""
    result = run_dag(handoff.datasets_dag)
    assert result.state == "success", result.states
    squares = sum(i * i for i in range(1000))
    for consumer in ("check_on_ray", "check_in_airflow"):
        seen = result.xcom(consumer)
        assert seen["from_ray"] == {"type": "MaterializedDataset", "rows": 1000, "blocks": 4, "sum": squares}
        assert seen["from_airflow"]["rows"] == 500 and seen["from_airflow"]["blocks"] == 2
        assert seen["from_airflow"]["sum"] == sum(i * i for i in range(500))
    summary = result.xcom_raw("make_on_ray", key="ds")["summary"]
    assert summary["dataset"] and summary["rows"] == 1000 and summary["bytes"] > 0
    assert result.xcom_raw("make_in_airflow")["summary"]["rows"] == 500


def test_zero_copy_and_handles_not_values_in_airflow(run_dag):
    from airflow.models.renderedtifields import RenderedTaskInstanceFields as RTIF
    from airflow.utils.session import create_session

    result = run_dag(handoff.zero_copy_dag)
    assert result.state == "success", result.states
    on_ray = result.xcom("inspect_on_ray")
    assert on_ray["read_only"] and on_ray["shared"]  # a view of shared memory, not a copy
    assert on_ray["nested_read_only"]  # an upstream output nested in a list/dict arg
    assert on_ray["sum"] == 2 * 20_000_000 // 8
    assert result.xcom("inspect_in_airflow")["read_only"]  # ray.get of numpy is zero-copy too
    with create_session() as session:
        rendered = (
            session.query(RTIF)
            .filter_by(dag_id=result.dag_id, run_id=result.run_id, task_id="inspect_on_ray")
            .one()
        )
    # What Airflow rendered for the Ray consumer was a handle, never the 20 MB array.
    assert "<Ray object" in str(rendered.rendered_fields["op_args"])


def test_concurrent_runs_of_one_dag_are_isolated(run_dag):
    first = run_dag(handoff.isolation_dag, run_conf={"value": 7})
    second = run_dag(handoff.isolation_dag, run_conf={"value": 9})
    assert (first.xcom("consume"), second.xcom("consume")) == (7, 9)
    # the first run's object is still there and still its own after the second run
    assert int(first.xcom("produce")[0]) == 7
    assert first.xcom_raw("produce")["object_id"] != second.xcom_raw("produce")["object_id"]


def test_independent_ray_tasks_run_in_parallel(ray_cluster, tmp_path):
    """8 tasks of 2 s each, submitted at once through one owner, all run at the same time.

    Each task waits at a barrier until all 8 have started: if the owner ran them one at a time
    (as the archived provider's single actor did) the first would wait forever. No timing
    assertion: worker start-up on a loaded 2-core machine takes seconds.
    """
    from airflow_ray.hooks import RayHook

    RayHook().connect()
    barrier = str(tmp_path)
    results: dict[int, bool] = {}

    def sleeper(i: int, directory: str) -> bool:
        import os
        import time

        open(os.path.join(directory, str(i)), "w").close()
        deadline = time.time() + 120
        while len(os.listdir(directory)) < 8:
            if time.time() > deadline:
                return False
            time.sleep(0.05)
        time.sleep(2)
        return True

    def submit(i: int) -> None:
        request = tasks.TaskRequest(
            fn=sleeper,
            args=(i, barrier),
            kwargs={},
            task_key=("parallel", "run", f"t{i}", -1),
            options={"num_cpus": 0.1},
        )
        produced = tasks.run(request, _null_log())["outputs"]
        results[i] = ray.get(outputs.resolve([_reference("parallel", "run", f"t{i}", produced[0])])[0])

    started = time.monotonic()
    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"8 x 2 s tasks took {time.monotonic() - started:.1f} s")
    assert results == dict.fromkeys(range(8), True), "not all 8 tasks were running at the same time"


def test_retry_attaches_to_the_still_running_ray_task(ray_cluster, tmp_path, caplog):
    """A retry whose first try's Airflow process died (never cancelled its Ray task) waits for
    that Ray task and takes its result: the function runs once."""
    import logging

    from airflow_ray.hooks import RayHook

    RayHook().connect()
    runs = tmp_path / "runs"

    def slow(path: str) -> str:
        import os
        import time

        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(3)
        return "done"

    def request() -> tasks.TaskRequest:
        return tasks.TaskRequest(
            fn=slow,
            args=(str(runs),),
            kwargs={},
            task_key=("reattach", "run", "t", -1),
            options={"num_cpus": 0.1},
        )

    first: dict = {}
    try_1 = threading.Thread(
        target=lambda: first.update(outputs=tasks.run(request(), _null_log())["outputs"])
    )
    try_1.start()
    deadline = time.monotonic() + 120
    while not runs.exists():  # the function is running
        assert time.monotonic() < deadline, "the first try's function never started"
        time.sleep(0.1)
    with caplog.at_level(logging.WARNING):
        second = tasks.run(request(), logging.getLogger("retry"))["outputs"]
    try_1.join()
    assert len(runs.read_text().splitlines()) == 1  # the function ran once
    assert second[0]["object_id"] == first["outputs"][0]["object_id"]
    assert "still running on Ray from an earlier try" in caplog.text


def test_purge_and_rerun_free_objects(ray_cluster):
    """Re-running a task replaces its outputs; purging an XCom frees its object."""
    from airflow.sdk.execution_time.comms import XComResult

    from airflow_ray.hooks import RayHook
    from airflow_ray.xcom import RayXComBackend

    RayHook().connect()
    owner = get_owner(owner_name("lifetime", "run"), create=True)

    def run_once() -> dict:
        request = tasks.TaskRequest(
            fn=lambda: bytearray(10_000_000),
            args=(),
            kwargs={},
            task_key=("lifetime", "run", "t", -1),
            options={"num_cpus": 0.1},
        )
        return tasks.run(request, _null_log())["outputs"][0]

    before = _object_ids(owner, "lifetime")
    first = run_once()
    second = run_once()  # a re-run of the same task instance
    assert _object_ids(owner, "lifetime") - before == {second["object_id"]}
    assert first["object_id"] != second["object_id"]
    reference = _reference("lifetime", "run", "t", second)
    # A row that only claims to be the reference (unsigned, as the REST API could write it)
    # frees nothing; the signed one the task wrote frees the object.
    forged = {**reference.to_json(), "signature": ""}
    RayXComBackend.purge(XComResult(key="return_value", value=forged))
    assert _object_ids(owner, "lifetime") - before == {second["object_id"]}
    RayXComBackend.purge(XComResult(key="return_value", value=_signed(reference)))
    assert _object_ids(owner, "lifetime") == before
    with pytest.raises(RayObjectLostError, match="task 't' of DAG 'lifetime', run 'run'"):
        outputs.resolve([reference])


def test_deleted_run_is_garbage_collected(run_dag, ray_cluster):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    from airflow_ray import retention

    result = run_dag(handoff.isolation_dag, run_conf={"value": 3})
    produced = result.xcom_raw("produce")["object_id"]
    owner = get_owner(owner_name(result.dag_id, result.run_id))
    assert produced in _object_ids(owner, result.dag_id)
    with create_session() as session:  # what deleting the run in the UI does
        session.query(DagRun).filter_by(dag_id=result.dag_id, run_id=result.run_id).delete()
    counts = retention.collect(grace_seconds=0)  # the run just ended: no grace period here
    assert counts["freed"] >= 1
    assert produced not in _object_ids(owner, result.dag_id)


def test_owner_loss_gives_a_clear_error_naming_the_upstream(run_dag):
    result = run_dag(handoff.isolation_dag, run_conf={"value": 5})
    assert result.xcom("consume") == 5
    owner = get_owner(owner_name(result.dag_id, result.run_id))
    ray.kill(owner, no_restart=True)
    forget_owners()
    started = time.monotonic()
    with pytest.raises(RayObjectLostError) as excinfo:
        result.xcom("produce")
    message = str(excinfo.value)
    assert f"task 'produce' of DAG 'isolation', run '{result.run_id}', key 'return_value'" in message
    assert "re-run 'produce'" in message and "checkpoint=True" in message
    assert time.monotonic() - started < 30  # fails fast, never hangs
    handle = ObjectHandle(_reference_from_raw(result.xcom_raw("produce")))
    with pytest.raises(RayObjectLostError):
        outputs.resolve([handle.reference])


# --- helpers -------------------------------------------------------------------------------


def _null_log():
    import logging

    return logging.getLogger("tests")


def _reference(dag_id, run_id, task_id, output):
    from airflow_ray.references import ObjectReference

    return ObjectReference(
        owner=owner_name(dag_id, run_id),
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=-1,
        key=output["key"],
        object_id=output["object_id"],
        summary=output["summary"],
    )


def _signed(reference) -> dict:
    """The JSON the XCom backend would store for ``reference`` (signed for this deployment)."""
    from airflow_ray import deployment

    me = deployment.current()
    return reference.signed(me.id, me.key).to_json()


def _reference_from_raw(raw):
    from airflow_ray.outputs import references_in

    return references_in(raw)[0]


def _object_ids(owner, dag_id) -> set[str]:
    return {e["object_id"] for e in ray.get(owner.entries.remote()) if e["key"][0] == dag_id}
