"""Test DAGs for checkpoints: checkpointed Ray and plain producers, and both kinds of consumer.

Checkpoints are on for the whole DAG through ``default_args``: ``@ray_task`` takes them as
arguments, and the plain ``@task`` (which has no such argument) gets them through the XCom
backend, which reads the same ``default_args``.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from airflow.sdk import dag, task

from airflow_ray import ray_task


def digest(array: np.ndarray, frame: pd.DataFrame, plain: pd.DataFrame) -> str:
    """A hash of every byte of the three outputs: equal hashes mean identical data."""
    h = hashlib.sha256(np.ascontiguousarray(array).tobytes())
    for df in (frame, plain):
        h.update(pd.util.hash_pandas_object(df, index=True).to_numpy().tobytes())
    return h.hexdigest()


def make_outputs() -> dict:
    rng = np.random.default_rng(1)
    return {"array": rng.normal(size=200_000), "frame": pd.DataFrame({"a": np.arange(50_000)})}


def make_plain() -> pd.DataFrame:
    rng = np.random.default_rng(2)
    return pd.DataFrame({"x": rng.normal(size=20_000), "s": ["p", "q"] * 10_000})


def _pipeline(with_ray_consumer: bool = True) -> None:
    @ray_task(num_cpus=0.5, multiple_outputs=True)
    def produce() -> dict:
        return make_outputs()

    @task
    def produce_plain() -> pd.DataFrame:
        return make_plain()

    @task
    def consume(array: np.ndarray, frame: pd.DataFrame, plain: pd.DataFrame) -> str:
        return digest(array, frame, plain)

    @ray_task(num_cpus=0.5)
    def consume_on_ray(array: np.ndarray, frame: pd.DataFrame, plain: pd.DataFrame) -> str:
        return digest(array, frame, plain)

    out, plain = produce(), produce_plain()
    consume(out["array"], out["frame"], plain)
    if with_ray_consumer:
        consume_on_ray(out["array"], out["frame"], plain)


@dag(
    dag_id="checkpointed",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_path": "{{ dag_run.conf['base'] }}"},
)
def checkpointed():
    _pipeline()


@dag(
    dag_id="checkpointed_s3",
    schedule=None,
    # bucket, prefix, endpoint and credentials: all from the aws connection (tests/s3_server.py)
    default_args={"checkpoint": True, "checkpoint_source": "checkpoint_s3"},
)
def checkpointed_s3():
    _pipeline(with_ray_consumer=False)


@dag(
    dag_id="checkpoint_keys",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_path": "{{ dag_run.conf['base'] }}"},
)
def checkpoint_keys():
    @ray_task(num_cpus=0.5, multiple_outputs=True)
    def produce() -> dict:  # keys that are no safe directory names (Airflow's API refuses a "/")
        return {"..hidden": np.arange(10_000), "train set:v1": np.arange(20_000), "named": np.arange(5_000)}

    produce()


checkpointed_dag = checkpointed()
checkpoint_keys_dag = checkpoint_keys()
checkpointed_s3_dag = checkpointed_s3()


@dag(
    dag_id="checkpoint_trust",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_path": "{{ dag_run.conf['base'] }}"},
)
def checkpoint_trust():
    """Checkpoints rewritten on the store between their write and their restore (see the test)."""

    @ray_task(num_cpus=0.5, multiple_outputs=True)
    def produce() -> dict:
        return make_outputs()

    @task
    def rewrite_the_bucket(run_id=None) -> None:
        from tests import helpers

        helpers.HARNESS["rewrite_the_bucket"](run_id)  # set by the test, which owns tmp_path

    @task
    def consume_frame(frame: pd.DataFrame) -> int:
        return len(frame)

    @ray_task(num_cpus=0.5)
    def consume_frame_on_ray(frame: pd.DataFrame) -> int:
        return len(frame)

    @task
    def consume_array(array: np.ndarray) -> float:
        return float(array.sum())

    out = produce()
    rewritten = rewrite_the_bucket()
    out >> rewritten
    rewritten >> [
        consume_frame(out["frame"]),
        consume_frame_on_ray(out["frame"]),
        consume_array(out["array"]),
    ]


@dag(
    dag_id="checkpoint_pickle",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_path": "{{ dag_run.conf['base'] }}"},
)
def checkpoint_pickle():
    @ray_task(num_cpus=0.5)
    def produce() -> object:  # only pickle holds it; too large to stay in the XCom table (not `-> dict`:
        # that would make it multiple_outputs)
        return {"weights": list(range(2000)), "name": "model"}

    produce()


def _traversal_keys() -> None:
    @ray_task(num_cpus=0.5, multiple_outputs=True)
    def produce() -> dict:
        return {"../../x": np.arange(1_000), "kept": np.arange(2_000)}

    produce()


@dag(
    dag_id="checkpoint_traversal",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_path": "{{ dag_run.conf['base'] }}"},
)
def checkpoint_traversal():
    _traversal_keys()


@dag(
    dag_id="checkpoint_traversal_s3",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_source": "checkpoint_s3"},
)
def checkpoint_traversal_s3():
    _traversal_keys()


checkpoint_trust_dag = checkpoint_trust()
checkpoint_pickle_dag = checkpoint_pickle()
checkpoint_traversal_dag = checkpoint_traversal()
checkpoint_traversal_s3_dag = checkpoint_traversal_s3()
