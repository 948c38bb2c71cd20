"""One Airflow deployment's side of tests/test_deployments.py, run in its own AIRFLOW_HOME.

Usage: ``python tests/scripts/deployment.py <value> [gc]`` runs ``shared_ids`` with a fixed
logical date (so both deployments have the same run id) and ``params.value``, then, with ``gc``,
``airflow-ray gc``'s collection (in the same process: a second one would cost CI ~10 s). Prints
one line ``DEPLOYMENT=<json>``.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime

RESULT = "DEPLOYMENT="
LOGICAL_DATE = datetime(2026, 1, 1, tzinfo=UTC)


def main(value: str, then: str = "") -> dict:
    from airflow_ray import deployment
    from tests.dags.deployments import shared_ids_dag
    from tests.helpers import run_dag

    report: dict = {"deployment": deployment.current().id}
    result = run_dag(
        shared_ids_dag,
        run_after=LOGICAL_DATE,
        logical_date=LOGICAL_DATE,
        run_conf={"value": int(value)},
    )
    report.update(
        run_id=result.run_id,
        states=result.states,
        consume=result.xcom("consume"),
        consume_on_ray=result.xcom("consume_on_ray"),
        owner=result.xcom_raw("produce")["owner"],
    )
    if then == "gc":
        from airflow_ray import retention

        report["gc"] = retention.collect(grace_seconds=0)  # the other's objects are seconds old
    return report


if __name__ == "__main__":
    print(RESULT + json.dumps(main(*sys.argv[1:])), flush=True)
