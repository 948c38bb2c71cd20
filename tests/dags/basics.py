"""Test DAGs for the decorator: mixing, options, templates, mapping."""

from __future__ import annotations

import os

import numpy as np
from airflow.sdk import dag, task

from airflow_ray import ray_task
from tests.dags import dag_helpers

SCALE = 3  # a module global the Ray function reads: it must travel by value


@dag(dag_id="mixing", schedule=None)
def mixing():
    @task
    def extract() -> list[int]:
        return [1, 2, 3]

    @ray_task(num_cpus=0.5)
    def square(xs: list[int]) -> dict:
        factor = SCALE
        return {"values": [x * x * factor for x in xs], "pid": os.getpid()}

    @task.ray(num_cpus=0.25)
    def shift(result: dict) -> list[int]:
        return dag_helpers.add_offset(result["values"])

    @task
    def load(values: list[int], squared: dict) -> dict:
        return {"values": values, "ray_pid": squared["pid"]}

    squared = square(extract())
    load(shift(squared), squared)


@dag(dag_id="options", schedule=None)
def options():
    @ray_task
    def stats(label: str, data_interval_start=None, ti=None) -> dict:
        return {
            "label": label,
            "n": len(label),
            "ti": f"{ti.task_id}/{ti.try_number}",
            "interval": data_interval_start.isoformat(),
        }

    @ray_task(multiple_outputs=True)
    def both() -> dict:
        return {"array": np.arange(1000), "name": "x"}

    @task
    def check(n: int, name: str, array: np.ndarray) -> dict:
        return {"n": n, "name": name, "sum": int(array.sum())}

    s = stats(label="run-{{ run_id }}")
    b = both()
    check(s["n"], b["name"], b["array"])


@dag(dag_id="mapping", schedule=None)
def mapping():
    @task
    def numbers() -> list[int]:
        return list(range(5))

    @ray_task(num_cpus=0.25)
    def ray_arrays() -> list[np.ndarray]:  # not JSON-like: the list stays in Ray's object store
        return [np.full(1000, v) for v in (10, 11, 12)]

    @ray_task(num_cpus=0.25)
    def times(x, factor: int) -> int:
        return int(x if np.isscalar(x) else x[0]) * factor

    @task
    def total(values) -> int:
        return sum(values)

    total(times.partial(factor=2).expand(x=numbers()))
    times.partial(factor=3).expand(x=ray_arrays())


mixing_dag = mixing()
options_dag = options()
mapping_dag = mapping()
