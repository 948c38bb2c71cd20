"""Test DAGs that reach Ray through a connection or an address other than the session's default.

``tests/test_hooks.py`` runs ``remote_client`` in an ``airflow dags test`` subprocess whose
``ray_default`` connection is the session head's Ray Client address, and ``unreachable``
in-process with a connection to a closed port; ``tests/test_multinode.py`` runs
``special_node`` against a two-node ``ray.cluster_utils.Cluster``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag, task

from airflow_ray import ray_task


@dag(dag_id="remote_client", schedule=None)
def remote_client():
    @task
    def numbers() -> list[int]:
        return [1, 2, 3]

    # Under load Ray's client proxy occasionally fails to start the per-client server
    # ("Starting Ray client server failed"); an Airflow retry is the remedy users have too.
    @ray_task(num_cpus=0.25, retries=1, retry_delay=timedelta(seconds=0))
    def describe(xs: list[int]) -> list:
        import ray

        return [sum(xs), ray.get_runtime_context().get_node_id()]

    describe(numbers())


@dag(dag_id="unreachable", schedule=None)
def unreachable():
    @ray_task(ray_conn_id="ray_closed_port")
    def never_runs() -> int:
        return 1

    never_runs()


@dag(dag_id="special_node", schedule=None)
def special_node():
    @ray_task(resources={"special": 1}, num_cpus=0.5)
    def where() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @ray_task(num_cpus=0.5)
    def anywhere() -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    where()
    anywhere()


remote_client_dag = remote_client()
unreachable_dag = unreachable()
special_node_dag = special_node()
