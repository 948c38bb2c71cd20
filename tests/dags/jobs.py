"""Test DAGs for ``RaySubmitJobOperator``: success, failure, timeout, deferral, a retry."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from airflow.sdk import dag

from airflow_ray.operators import RaySubmitJobOperator

SCRIPTS = str(Path(__file__).resolve().parents[1] / "job_scripts")


@dag(dag_id="job_succeeds", schedule=None)
def job_succeeds():
    RaySubmitJobOperator(
        task_id="emit",
        entrypoint="python emit.py --lines {{ params.lines }}",
        runtime_env={"working_dir": SCRIPTS},
        entrypoint_num_cpus=0.1,
        metadata={"purpose": "test"},
        params={"lines": 5},
    )


@dag(dag_id="job_fails", schedule=None)
def job_fails():
    RaySubmitJobOperator(
        task_id="emit",
        entrypoint="python emit.py --lines 40 --exit-code 3",
        runtime_env={"working_dir": SCRIPTS},
    )


@dag(dag_id="job_times_out", schedule=None)
def job_times_out():
    RaySubmitJobOperator(
        task_id="emit",
        entrypoint="python emit.py --lines 1 --sleep 600",
        runtime_env={"working_dir": SCRIPTS},
        execution_timeout=timedelta(seconds=15),
    )


@dag(dag_id="job_deferred", schedule=None)
def job_deferred():
    RaySubmitJobOperator(
        task_id="emit",
        entrypoint="python emit.py --lines 3 --interval 1",
        runtime_env={"working_dir": SCRIPTS},
        deferrable=True,
        poll_interval=0.5,
    )


class _CrashesOnFirstTry(RaySubmitJobOperator):
    """The first try dies after submitting (as a killed worker would), leaving the job running."""

    def poll_until_complete(self, external_id, context):
        if context["ti"].try_number == 1:
            raise RuntimeError("simulated worker death while the job runs")
        return super().poll_until_complete(external_id, context)


@dag(dag_id="job_retried", schedule=None)
def job_retried():
    _CrashesOnFirstTry(
        task_id="emit",
        entrypoint="python emit.py --lines 3 --interval 1",
        runtime_env={"working_dir": SCRIPTS},
        retries=1,
        retry_delay=timedelta(seconds=0),
    )


succeeds_dag = job_succeeds()
fails_dag = job_fails()
times_out_dag = job_times_out()
deferred_dag = job_deferred()
retried_dag = job_retried()
