"""Run the ``special_node`` test DAG on a two-node ``ray.cluster_utils.Cluster`` (a subprocess of
``tests/test_multinode.py``: the pytest process stays a driver of the session's cluster).

Usage: ``python tests/scripts/multinode.py TEMP_DIR``. Prints one line ``MULTINODE=<json>`` with
the node ids, what the tasks returned, and how token auth behaved; always shuts the cluster down.
"""

from __future__ import annotations

import json
import os
import sys

RESULT = "MULTINODE="
STORE_BYTES = 200 * 1024**2


def main(temp_dir: str) -> dict:
    from ray.cluster_utils import Cluster

    from airflow_ray.compat import apply_env
    from airflow_ray.hooks import RayHook
    from tests.dags import remote
    from tests.helpers import run_dag

    report: dict = {"auth_mode_before": os.environ.get("RAY_AUTH_MODE")}
    # A cluster_utils head enables token auth only when its environment asks for it (unlike
    # `ray start --head`); ask, so that both nodes and the driver must use the local token file.
    apply_env({"RAY_AUTH_MODE": "token"})  # Ray read its config when imported: refresh it
    cluster = Cluster(
        initialize_head=True,
        # Nothing here uses the dashboard's modules or the log monitor: without them (Ray keeps
        # only the dashboard's usage-stats head) the head runs ~9 processes fewer (CI time).
        head_node_args={
            "num_cpus": 1,
            "object_store_memory": STORE_BYTES,
            "temp_dir": temp_dir,
            "include_dashboard": False,
            "include_log_monitor": False,
        },
    )
    try:
        special = cluster.add_node(num_cpus=1, resources={"special": 1}, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()
        del os.environ["RAY_AUTH_MODE"]  # the driver below must find out by itself
        report.update(
            address=cluster.address,
            head_node_id=cluster.head_node.node_id,
            special_node_id=special.node_id,
        )
        report["auth"] = _auth_behaviour(cluster.address)

        os.environ["RAY_ADDRESS"] = cluster.address
        target = RayHook().target
        report.update(source=target.source, hook_auth_mode=target.env.get("RAY_AUTH_MODE"))
        result = run_dag(remote.special_node_dag)
        report.update(state=result.state, states=result.states)
        if result.state == "success":
            report["where"] = result.xcom("where")
            report["anywhere"] = result.xcom("anywhere")
        report["node_loss"] = _node_loss(cluster, special, temp_dir)
        return report
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def _node_loss(cluster, special, temp_dir: str) -> dict:
    """Run ``node_loss``: its producers' outputs die with the special node, mid-run."""
    import logging

    from tests import helpers
    from tests.dags import remote
    from tests.helpers import run_dag

    def lose_node() -> None:
        cluster.remove_node(special)  # kills its raylet and object store: its objects are lost
        cluster.add_node(num_cpus=1, resources={"special": 1}, object_store_memory=STORE_BYTES)
        cluster.wait_for_nodes()

    helpers.HARNESS["lose_node"] = lose_node
    restored: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("Restored"):
                restored.append(record.getMessage())

    logging.getLogger("airflow_ray").addHandler(Collect())
    result = run_dag(remote.node_loss_dag, run_conf={"base": f"file://{temp_dir}/checkpoints"})
    report = {"state": result.state, "states": result.states, "restored": restored}
    if result.state == "success":
        report.update(on_ray=result.xcom("consume_on_ray"), in_airflow=result.xcom("consume_in_airflow"))
    return report


def _auth_behaviour(address: str) -> dict:
    """Does this cluster demand a token? Probe it without one and with the local token file."""
    from airflow_ray.compat import apply_env
    from airflow_ray.exceptions import RayConnectionError
    from airflow_ray.hooks.ray import RayTarget, probe

    outcome = {}
    for label, env in (
        ("no_token", {"RAY_AUTH_MODE": "disabled"}),
        ("token_file", {"RAY_AUTH_MODE": "token"}),
    ):
        apply_env(env)
        try:
            probe(RayTarget(address=address, source=label))
            outcome[label] = "ok"
        except RayConnectionError as exc:
            outcome[label] = f"{type(exc).__name__}: {exc}"
    os.environ.pop("RAY_AUTH_MODE", None)
    return outcome


if __name__ == "__main__":
    print(RESULT + json.dumps(main(sys.argv[1]), default=str), flush=True)
