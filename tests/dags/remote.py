"""Test DAGs that reach Ray through a connection or an address other than the session's default.

``tests/test_hooks.py`` runs ``remote_client`` in an ``airflow dags test`` subprocess whose
``ray_default`` connection is the session head's Ray Client address, and ``unreachable``
in-process with a connection to a closed port; ``tests/test_multinode.py`` runs
``special_node`` and ``node_loss`` against a two-node ``ray.cluster_utils.Cluster``.
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

    # Ray's client proxy occasionally fails to start the per-client server ("Starting Ray client
    # server failed"); the hook connects again up to 3 times, and a retry is what users add too.
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


@dag(dag_id="node_loss", schedule=None)
def node_loss():
    """Both producers' outputs live on the 'special' node, which dies before the consumers run."""

    @ray_task(resources={"special": 1}, num_cpus=0.5)
    def produce_lineage():
        import numpy as np

        return np.arange(3_000_000, dtype=np.float64)  # lost with its node: Ray re-runs the task

    @ray_task(
        resources={"special": 1},
        num_cpus=0.5,
        max_retries=0,
        checkpoint=True,
        checkpoint_path="{{ dag_run.conf['base'] }}",
    )
    def produce_checkpointed():
        import numpy as np

        return np.arange(3_000_000, dtype=np.float64) * 2  # no lineage: only its checkpoint remains

    @task
    def lose_node() -> None:
        from tests import helpers

        helpers.HARNESS["lose_node"]()  # set by tests/scripts/multinode.py, which owns the cluster

    @ray_task(num_cpus=0.5)
    def consume_on_ray(a, b) -> list:
        return [float(a.sum()), float(b.sum())]

    @task
    def consume_in_airflow(a, b) -> list:
        return [float(a.sum()), float(b.sum())]

    a, b = produce_lineage(), produce_checkpointed()
    lost = lose_node()
    [a, b] >> lost
    lost >> [consume_on_ray(a, b), consume_in_airflow(a, b)]


remote_client_dag = remote_client()
unreachable_dag = unreachable()
special_node_dag = special_node()
node_loss_dag = node_loss()
