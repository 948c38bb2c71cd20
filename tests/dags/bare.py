"""A DAG for a Ray cluster without airflow-ray: its Ray tasks report where they ran.

``tests/test_bare_cluster.py`` runs it against a cluster started from a virtualenv that has Ray
and the data libraries but neither Airflow nor airflow-ray.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from airflow_ray import ray_task

BARE = {"bare": 1}  # the custom resource only the bare cluster's node has


def where() -> dict:
    """The worker's Python, and whether Airflow or airflow-ray could be imported there."""
    import importlib.util
    import sys

    return {
        "python": sys.executable,
        "airflow_ray": importlib.util.find_spec("airflow_ray") is not None,
        "airflow": importlib.util.find_spec("airflow") is not None,
    }


@dag(schedule=None, default_args={"checkpoint": True})
def bare_cluster():
    @ray_task(resources=BARE, checkpoint=True, multiple_outputs=True)
    def produce() -> dict:
        import numpy as np
        import pandas as pd

        frame = pd.DataFrame({"x": np.arange(50_000, dtype="float64")})
        return {"frame": frame, "array": np.arange(100_000, dtype="int64"), "where": where()}

    @ray_task(resources=BARE)
    def consume(frame, array) -> dict:
        return {"sum": float(frame["x"].sum()) + float(array.sum()), "where": where()}

    @task
    def adopt() -> list[int]:  # a plain output adopted by the owner and checkpointed on the cluster
        return list(range(20_000))

    @ray_task(resources=BARE)
    def count(values) -> int:
        return len(values)

    out = produce()
    consume(out["frame"], out["array"])
    count(adopt())


bare_cluster_dag = bare_cluster()
