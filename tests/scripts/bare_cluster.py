"""Run the ``bare_cluster`` DAG against the cluster in ``RAY_ADDRESS``, then lose its owner and restore.

Started by ``tests/test_bare_cluster.py`` in a fresh process (its own Ray driver). Prints one line
``BARE=<json>``: the task states, what the Ray tasks reported about their workers, and the values
read back after the owner actor was killed (restored from checkpoints, on the cluster).
"""

from __future__ import annotations

import json
import logging

RESULT = "BARE="


def main() -> dict:
    import ray

    from airflow_ray import tasks
    from airflow_ray.outputs import references_in
    from airflow_ray.owners import forget_owners, get_owner
    from airflow_ray.references import handle_for
    from tests.dags.bare import BARE, bare_cluster_dag
    from tests.helpers import run_dag

    result = run_dag(bare_cluster_dag)
    report: dict = {"states": result.states, "where": result.xcom("produce", "where")}
    report["consume"] = result.xcom("consume")
    frame_ref = references_in(result.xcom_raw("produce", "frame"))[0]
    array_ref = references_in(result.xcom_raw("produce", "array"))[0]
    adopted_ref = references_in(result.xcom_raw("adopt"))[0]
    report["checkpoints"] = [r.checkpoint_uri for r in (frame_ref, array_ref, adopted_ref)]

    ray.kill(get_owner(frame_ref.owner), no_restart=True)  # every object of the run is lost
    forget_owners()
    report["adopted_after_loss"] = len(result.xcom("adopt"))  # a plain consumer: restored
    request = tasks.TaskRequest(
        fn=lambda frame, array: float(frame["x"].sum()) + float(array.sum()),
        args=(handle_for(frame_ref), handle_for(array_ref)),
        kwargs={},
        task_key=("bare_cluster", result.run_id, "consume_again", -1),
        options={"resources": BARE},
        inline_limit=None,  # the sum comes back as a value
    )
    reply = tasks.run(request, logging.getLogger("bare"))  # a Ray consumer: restored, then run
    report["sum_after_loss"] = reply["outputs"][0]["value"]
    return report


if __name__ == "__main__":
    print(RESULT + json.dumps(main(), default=str), flush=True)
