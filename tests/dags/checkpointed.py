"""Test DAGs for checkpoints: a checkpointed Ray producer and its consumer."""

from __future__ import annotations

import numpy as np
import pandas as pd
from airflow.sdk import dag, task

from airflow_ray import ray_task


@dag(dag_id="checkpointed", schedule=None, default_args={"checkpoint": True})
def checkpointed():
    @ray_task(num_cpus=0.5, checkpoint_path="{{ dag_run.conf['base'] }}", multiple_outputs=True)
    def produce() -> dict:
        rng = np.random.default_rng(1)
        return {"array": rng.normal(size=200_000), "frame": pd.DataFrame({"a": np.arange(50_000)})}

    @task
    def consume(array: np.ndarray, frame: pd.DataFrame) -> float:
        return float(array.sum()) + float(frame["a"].sum())

    out = produce()
    consume(out["array"], out["frame"])


checkpointed_dag = checkpointed()
