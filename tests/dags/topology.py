"""The multi-host test DAGs (``tests/test_topology.py``), one per way an Airflow worker reaches Ray.

``topology_ray_node`` reaches the cluster through its host's own raylet (connection
``ray_node``: address ``auto``), ``topology_ray_client`` through the head's Ray Client server
(``ray_client``: ``ray://198.18.0.1:10001``). Celery queues pin each Airflow task to a host:
``h3`` is the Airflow worker on host 3, ``h4`` the one on host 4 (``tests/topology.py``).
"""

from __future__ import annotations

import hashlib
import socket
from datetime import timedelta

import numpy as np
from airflow.sdk import dag, task

from airflow_ray import ray_task
from airflow_ray.operators import RaySubmitJobOperator

#: Large enough that the Ray XCom backend keeps it in the object store, not in the XCom row.
PAYLOAD_BYTES = 4 * 1024**2


def this_host_ip() -> str:
    """The address this process's host has on the topology's bridge (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("198.18.0.254", 9))
        return sock.getsockname()[0]


def digest(data: np.ndarray) -> str:
    return hashlib.sha256(data.tobytes()).hexdigest()


def topology_dag(conn_id: str):
    # One retry, as in tests/dags/remote.py: Ray's client proxy occasionally fails to start the
    # per-client server ("Starting Ray client server failed") more often than the hook retries.
    retry_once = {"retries": 1, "retry_delay": timedelta(seconds=0)}

    @dag(dag_id=f"topology_{conn_id}", schedule=None, default_args={"queue": "h3", **retry_once})
    def reach_the_cluster():
        @ray_task(ray_conn_id=conn_id, resources={"host2": 1}, num_cpus=0.25)
        def on_host2() -> str:
            import ray

            return ray.util.get_node_ip_address()

        @ray_task(ray_conn_id=conn_id, num_cpus=0.25, multiple_outputs=True, checkpoint=True)
        def produce() -> dict:
            data = np.frombuffer(np.random.default_rng().bytes(PAYLOAD_BYTES), dtype=np.uint8)
            return {"data": data, "digest": digest(data)}

        @ray_task(ray_conn_id=conn_id, num_cpus=0.25, queue="h4")
        def consume_on_ray(data: np.ndarray, expected: str) -> dict:
            import ray

            return {
                "ok": digest(data) == expected,
                "size": data.size,
                "ray_node": ray.util.get_node_ip_address(),
            }

        @task(queue="h4")
        def consume_plain(data: np.ndarray, expected: str) -> dict:
            return {"ok": digest(data) == expected, "size": data.size, "airflow_host": this_host_ip()}

        RaySubmitJobOperator(
            task_id="job",
            ray_conn_id=conn_id,
            entrypoint="python -c \"import socket; print('job ran on', socket.gethostname())\"",
            deferrable=True,
            poll_interval=1,
        )

        @task(multiple_outputs=True)  # on host 3: the XCom backend hands "data" to the run's owner
        def produce_plain() -> dict:
            data = np.frombuffer(np.random.default_rng().bytes(PAYLOAD_BYTES), dtype=np.uint8)
            return {"data": data, "digest": digest(data)}

        @ray_task(ray_conn_id=conn_id, num_cpus=0.25, queue="h4")
        def consume_plain_output(data: np.ndarray, expected: str) -> dict:
            return {"ok": digest(data) == expected, "size": data.size}

        on_host2()
        out = produce()
        consume_on_ray(out["data"], out["digest"])
        consume_plain(out["data"], out["digest"])
        plain = produce_plain()
        consume_plain_output(plain["data"], plain["digest"])

    return reach_the_cluster()


topology_ray_node = topology_dag("ray_node")
topology_ray_client = topology_dag("ray_client")
