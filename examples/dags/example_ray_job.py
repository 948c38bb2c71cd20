"""Run an existing Ray script as a Ray Job from Airflow, waiting in the triggerer.

The script (``examples/jobs/pi.py``) knows nothing about Airflow; its directory is uploaded as
the job's ``working_dir``. Its output appears in the task log as it is written, the task's
"Ray Dashboard" button opens the job's page, and a retry re-attaches to a job that still runs.

    airflow dags test example_ray_job   # on the embedded local Ray, started with its dashboard:
                                        # AIRFLOW__RAY__LOCAL_CLUSTER_DASHBOARD=True
"""

from __future__ import annotations

# [START howto_ray_submit_job]
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import dag

from airflow_ray.operators import RaySubmitJobOperator

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@dag(schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False, tags=["airflow-ray"])
def example_ray_job():
    RaySubmitJobOperator(
        task_id="estimate_pi",
        entrypoint="python pi.py --samples {{ params.samples }}",  # templated
        runtime_env={"working_dir": str(JOBS)},  # a local directory: uploaded with the job
        entrypoint_num_cpus=0.25,  # also entrypoint_num_gpus / _memory / _resources
        params={"samples": 200_000},
        deferrable=True,  # wait in the triggerer, not in a worker slot
        execution_timeout=timedelta(minutes=10),  # the job is stopped if it runs longer
        retries=1,
    )


example_ray_job()
# [END howto_ray_submit_job]
