"""Test DAGs for deployments sharing one Ray cluster, and for references that were tampered with."""

from __future__ import annotations

import numpy as np
from airflow.sdk import dag, task

from airflow_ray import ray_task


@dag(dag_id="shared_ids", schedule=None, params={"value": 0})
def shared_ids():
    """Run by two deployments with the same DAG id, run id and task ids, and different data."""

    @ray_task(num_cpus=0.25)
    def produce(value: str) -> np.ndarray:
        return np.full(10_000, int(value))

    @task
    def adopt(value: str) -> np.ndarray:  # a plain task's large output: adopted by the owner
        return np.full(10_000, int(value) * 10)

    @task
    def consume(kept: np.ndarray, adopted: np.ndarray) -> list[int]:
        print(f"CONSUMED={int(kept[0])},{int(adopted[0])}")
        return [int(kept[0]), int(adopted[0])]

    @ray_task(num_cpus=0.25)
    def consume_on_ray(kept: np.ndarray, adopted: np.ndarray) -> list[int]:
        return [int(kept[0]), int(adopted[0])]

    value = "{{ params.value }}"
    kept, adopted = produce(value), adopt(value)
    consume(kept, adopted)
    consume_on_ray(kept, adopted)


@dag(dag_id="forged_reference", schedule=None)
def forged_reference():
    """A plain task returns an edited copy of another task's reference: no consumer may use it."""

    @ray_task(num_cpus=0.25)
    def produce() -> np.ndarray:
        return np.arange(10_000)

    @task
    def forge(run_id: str | None = None) -> dict:
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session

        with create_session() as session:  # the raw row, as any task could read it
            row = session.query(XComModel).filter_by(dag_id="forged_reference", task_id="produce").first()
            reference = dict(row.value)
        # Point it at another DAG's run; the signature is the producer's, for other fields.
        return {**reference, "dag_id": "some_other_dag", "checkpoint_uri": "file:///etc/"}

    @task
    def consume(arr: np.ndarray) -> int:
        return int(arr.sum())

    @ray_task(num_cpus=0.25)
    def consume_on_ray(arr: np.ndarray) -> int:
        return int(arr.sum())

    forged = forge()
    produce() >> forged
    consume(forged)
    consume_on_ray(forged)


shared_ids_dag = shared_ids()
forged_reference_dag = forged_reference()
