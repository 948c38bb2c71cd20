"""Run the HIGGS XGBoost DAG once on the embedded local Ray and print what it produced.

Used by ``scripts/demo``. Everything is local: a SQLite Airflow home under ``.demo/``, the
Ray XCom backend, and the embedded Ray cluster (started on first use, stopped at the end
unless ``--keep-cluster``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=None, help="synthetic HIGGS rows (default: the DAG's)")
    parser.add_argument("--keep-cluster", action="store_true", help="leave the embedded Ray cluster running")
    args = parser.parse_args()
    home = ROOT / ".demo"
    home.mkdir(exist_ok=True)
    os.environ.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "examples" / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__XCOM_BACKEND": "airflow_ray.xcom.RayXComBackend",
            "AIRFLOW__RAY__LOCAL_CLUSTER_DIR": str(home / "ray"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        }
    )
    print("Setting up Airflow (SQLite) in .demo/ ...", flush=True)
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    print("Starting the embedded Ray cluster and running the higgs_xgboost DAG ...", flush=True)
    sys.path.insert(0, str(ROOT / "examples" / "dags"))
    from higgs_xgboost import higgs_xgboost_dag

    from airflow_ray import cluster

    conf = {"n_rows": args.rows} if args.rows else None
    try:
        dag_run = higgs_xgboost_dag.test(run_conf=conf)
        metrics = _metrics(dag_run)
    finally:
        if not args.keep_cluster:
            cluster.stop()
    if str(dag_run.state) != "success" or metrics is None:
        print(f"The DAG run ended {dag_run.state}; see the log above.")
        return 1
    print()
    print("HIGGS XGBoost on Ray Train, run by Airflow with airflow-ray")
    for name in ("accuracy", "auc", "logloss"):
        if name in metrics:
            print(f"  held-out {name:<9} {metrics[name]:.4f}")
    for name in ("model_path", "model_uri", "checkpoint"):
        if metrics.get(name):
            print(f"  model saved at   {metrics[name]}")
    return 0


def _metrics(dag_run) -> dict | None:
    from airflow.models.xcom import XComModel
    from airflow.sdk.execution_time.comms import XComResult
    from airflow.sdk.execution_time.xcom import XCom
    from airflow.utils.session import create_session

    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=dag_run.dag_id, run_id=dag_run.run_id, task_id="evaluate", key="return_value")
            .one_or_none()
        )
        if row is None:
            return None
        value = row.value
    return XCom.deserialize_value(XComResult(key="return_value", value=value))


if __name__ == "__main__":
    sys.exit(main())
