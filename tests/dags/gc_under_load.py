"""A DAG for the gc-while-running test (tests/test_local_executor.py): every consumer checks its data.

Each run's outputs depend on its run id, so a consumer that got another run's data, or lost
data, fails its run. The producers leave the windows a careless gc would fall into: a Ray task's
outputs are registered by the owner before they are checkpointed and before their XCom rows are
pushed one key after the other; a plain task's output is adopted just before its row is written.
"""

from __future__ import annotations

import zlib

import numpy as np
from airflow.sdk import dag, task

from airflow_ray import ray_task

KEYS = ("a", "b", "c", "d")


def expected(run: str, key: str) -> np.ndarray:
    """What every output of the run must hold (~400 KB, far above the inline threshold)."""
    seed = zlib.crc32(f"{run}/{key}".encode())
    return np.random.default_rng(seed).normal(size=50_000)


def check(run: str, outputs: dict) -> int:
    for key, value in outputs.items():
        if not np.array_equal(value, expected(run, key)):
            raise AssertionError(f"output {key!r} of run {run!r} is not what it produced")
    return len(outputs)


@dag(
    dag_id="gc_under_load",
    schedule=None,
    default_args={"checkpoint": True, "checkpoint_path": "{{ dag_run.conf['base'] }}"},
)
def gc_under_load():
    @ray_task(num_cpus=0.25, multiple_outputs=True)
    def produce(run: str) -> dict:
        return {key: expected(run, key) for key in KEYS}

    @task
    def produce_plain(run: str) -> np.ndarray:
        return expected(run, "plain")

    @task
    def consume(run: str, a, b, c, d, plain) -> int:
        return check(run, {"a": a, "b": b, "c": c, "d": d, "plain": plain})

    @ray_task(num_cpus=0.25)
    def consume_on_ray(run: str, a, b, c, d, plain) -> int:
        return check(run, {"a": a, "b": b, "c": c, "d": d, "plain": plain})

    run = "{{ run_id }}"
    out, plain = produce(run), produce_plain(run)
    args = [out[key] for key in KEYS]
    consume(run, *args, plain)
    consume_on_ray(run, *args, plain)


gc_under_load_dag = gc_under_load()
