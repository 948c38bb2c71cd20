"""Test DAGs for checkpoint assets: producers whose checkpoints update Assets, a DAG scheduled
on one, and the mistakes a user can make.

The assets' URIs must be known when the file is parsed (the scheduler matches events to DAGs by
them), so the base comes from the environment (``AIRFLOW_RAY_TEST_ASSETS``, set by conftest for
the test process and the services alike).
"""

from __future__ import annotations

import os

import pandas as pd
from airflow.sdk import dag, task

from airflow_ray import ray_task
from airflow_ray.assets import CheckpointAsset

BASE = os.environ.get("AIRFLOW_RAY_TEST_ASSETS", "file:///tmp/airflow-ray-test-assets")

# [START howto_checkpoint_asset]
features = CheckpointAsset(name="features", uri=f"{BASE}/features")
scores = CheckpointAsset(name="scores", uri=f"{BASE}/scores")


@dag(
    dag_id="asset_producer",
    schedule=None,
    # plain @task outputs are checkpointed through the Ray XCom backend, from default_args
    default_args={"checkpoint": True, "checkpoint_path": scores.uri},
)
def asset_producer():
    @ray_task(num_cpus=0.5, checkpoint_path=features.uri, outlets=[features])
    def make_features() -> pd.DataFrame:
        return pd.DataFrame({"x": range(1000), "y": [0.5] * 1000})

    @task(outlets=[scores])
    def score(frame: pd.DataFrame) -> list[float]:
        return [float(frame["x"].mean())]  # small: checkpointed anyway, the asset needs it

    score(make_features())


@dag(dag_id="asset_consumer", schedule=[features])  # runs when make_features wrote a checkpoint
def asset_consumer():
    @task
    def read_event(triggering_asset_events=None) -> dict:
        (event,) = triggering_asset_events[features]
        return event.extra  # the checkpoint's uri, format, rows, bytes and digest

    read_event()
    # [END howto_checkpoint_asset]


@dag(dag_id="asset_elsewhere", schedule=None)
def asset_elsewhere():
    @ray_task(checkpoint=True, checkpoint_path=f"{BASE}/not-features", outlets=[features])
    def misplaced() -> pd.DataFrame:
        return pd.DataFrame({"x": [1, 2, 3]})

    misplaced()


@dag(dag_id="asset_unchecked", schedule=None)
def asset_unchecked():
    @task(outlets=[scores])  # no checkpoint in default_args
    def unchecked() -> list[int]:
        return [1, 2, 3]

    unchecked()


asset_producer_dag = asset_producer()
asset_consumer_dag = asset_consumer()
asset_elsewhere_dag = asset_elsewhere()
asset_unchecked_dag = asset_unchecked()
