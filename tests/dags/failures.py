"""Test DAGs for failure behaviour: exceptions, retries, logs, timeouts, resources, pickling."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

from airflow.sdk import dag

from airflow_ray import ray_task

_LOCK = threading.Lock()


@dag(dag_id="flaky", schedule=None)
def flaky():
    @ray_task(retries=1, retry_delay=timedelta(seconds=0))
    def sometimes(path: str) -> int:
        with open(path, "a") as f:
            f.write("x")
        with open(path) as f:
            attempts = len(f.read())
        if attempts == 1:
            raise ValueError(f"first attempt fails ({attempts})")
        return attempts

    @ray_task
    def always():
        def inner_helper():
            raise KeyError("no such thing")

        inner_helper()

    sometimes("{{ dag_run.conf['marker'] }}")
    always()


@dag(dag_id="chatty", schedule=None)
def chatty():
    @ray_task
    def talk() -> int:
        import logging

        print("hello from the ray worker")
        logging.getLogger("user.module").info("an info record")
        logging.getLogger("user.module").warning("a warning record")
        return 1

    talk()


@dag(dag_id="timeout", schedule=None)
def timeout():
    @ray_task(execution_timeout=timedelta(seconds=4), num_cpus=0.25)
    def sleepy_for_timeout() -> int:
        time.sleep(300)
        return 1

    sleepy_for_timeout()


@dag(dag_id="infeasible", schedule=None)
def infeasible():
    @ray_task(num_gpus=1)
    def needs_gpu() -> int:
        return 1

    @ray_task(resources={"no_such": 1})
    def needs_custom() -> int:
        return 1

    needs_gpu()
    needs_custom()


@dag(dag_id="unpicklable", schedule=None)
def unpicklable():
    @ray_task
    def uses_lock() -> int:
        with _LOCK:
            return 1

    @ray_task
    def returns_lock():
        import threading

        return threading.Lock()

    uses_lock()
    returns_lock()


flaky_dag = flaky()
chatty_dag = chatty()
timeout_dag = timeout()
infeasible_dag = infeasible()
unpicklable_dag = unpicklable()
