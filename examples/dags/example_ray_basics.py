"""airflow-ray in one DAG: plain and Ray tasks mixed, resources per task, mapped tasks.

Runs on the embedded local Ray with nothing configured:

    AIRFLOW__CORE__XCOM_BACKEND=airflow_ray.xcom.RayXComBackend airflow dags test example_ray_basics
"""

from __future__ import annotations

# [START howto_ray_task]
import numpy as np
import pendulum
from airflow.sdk import dag, task

from airflow_ray import ray_task


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["airflow-ray"])
def example_ray_basics():
    @task
    def make_shards(n: int = 4) -> list[int]:
        """A plain Airflow task: decides how to split the work."""
        return list(range(n))

    @ray_task(num_cpus=0.5, memory=256 * 1024**2)
    def simulate(seed: int) -> np.ndarray:
        """Runs on Ray, once per shard (a mapped task); the array stays in Ray's object store."""
        rng = np.random.default_rng(seed)
        return rng.normal(size=250_000)

    @task.ray(num_cpus=0.5)
    def summarize(samples: list[np.ndarray]) -> dict[str, float]:
        """The same decorator under Airflow's @task namespace; gets every shard's array."""
        data = np.concatenate(samples)
        print(f"summarizing {len(samples)} shards, {data.size} samples")
        return {"mean": float(data.mean()), "std": float(data.std()), "n": int(data.size)}

    @task
    def report(stats: dict[str, float]) -> None:
        """A plain task again: small results come back as ordinary Python values."""
        print(f"mean={stats['mean']:.4f} std={stats['std']:.4f} over {stats['n']} samples")

    report(summarize(simulate.expand(seed=make_shards())))


example_ray_basics_dag = example_ray_basics()
# [END howto_ray_task]
