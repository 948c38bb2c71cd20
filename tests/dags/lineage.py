"""A DAG for the OpenLineage test: a checkpointed ``@ray_task``, a Ray consumer of its checkpoint,
and a Ray Job (tests/test_lineage.py runs it with OpenLineage's file transport)."""

from __future__ import annotations

import pandas as pd
from airflow.sdk import dag

from airflow_ray import ray_task
from airflow_ray.operators import RaySubmitJobOperator
from tests.dags.jobs import SCRIPTS


@dag(dag_id="lineage", schedule=None)
def lineage():
    @ray_task(
        num_cpus=0.5, memory=64 * 1024**2, checkpoint=True, checkpoint_path="{{ dag_run.conf['base'] }}"
    )
    def features() -> pd.DataFrame:
        return pd.DataFrame({"x": range(500)})

    @ray_task(num_cpus=0.25)
    def total(frame: pd.DataFrame) -> float:
        return float(frame["x"].sum())

    total(features())
    RaySubmitJobOperator(
        task_id="job",
        entrypoint="python emit.py --lines 1",
        runtime_env={"working_dir": SCRIPTS},
        entrypoint_num_cpus=0.1,
    )


lineage_dag = lineage()
