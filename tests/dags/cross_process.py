"""A DAG for the LocalExecutor test: every task runs in its own Airflow task process."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import psutil
from airflow.sdk import dag, task

from airflow_ray import ray_task


@dag(dag_id="cross_process", schedule=None)
def cross_process():
    @task(multiple_outputs=True)
    def produce() -> dict:
        # Nothing this task's process ran so far imports Ray: only the scheduler's preload can.
        preloaded = "ray" in sys.modules
        data = np.arange(2_000_000, dtype=np.float64)
        return {"data": data, "pid": os.getpid(), "ray_preloaded": preloaded}

    @ray_task(num_cpus=0.5)
    def transform(data: np.ndarray) -> np.ndarray:
        assert not data.flags.writeable  # zero-copy view of the owner's object
        return data * 2

    @task
    def consume(doubled: np.ndarray, producer_pid: int) -> dict:
        return {"sum": float(doubled.sum()), "producer_pid": producer_pid, "consumer_pid": os.getpid()}

    @ray_task(num_cpus=0.5)
    def worker_pid() -> dict:
        return {"pid": os.getpid(), "done_at": time.time()}

    @ray_task(num_cpus=0.5)
    def worker_pid_again(first: dict) -> dict:
        # ``transform`` may run beside ``worker_pid``, so two warm workers can exist and either may
        # take this task: what matters is that its worker was already running when ``worker_pid``
        # finished, i.e. before this task's Airflow task process started.
        me = psutil.Process()
        return {"first": first, "again": me.pid, "again_started_at": me.create_time()}

    out = produce()
    consume(transform(out["data"]), out["pid"])
    worker_pid_again(worker_pid())


cross_process_dag = cross_process()
