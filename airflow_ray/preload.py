"""Imported, it loads Ray and what a ``@ray_task``'s process uses, so that the processes forked
after it start with them loaded.

Airflow runs each task in a new process forked from a long-lived one: the LocalExecutor's
workers (forked from the scheduler) and a Celery worker's pool processes fork one per task.
Importing them cost each task process 0.5-0.7 s (2 cores, without compiled bytecode,
``docs/benchmarks.md``: 0.58 s per Celery task, 0.70 s per LocalExecutor task); a parent that
imported them first passes them on for free. That includes what Ray itself imports only on a
driver's first remote call (numpy, pyarrow: :func:`airflow_ray.compat.import_driver_modules`,
0.25 s per task process with compiled bytecode, ``benchmarks/task_process.py``).

Connecting (``ray.init``) stays in the task process: Ray's core worker does not survive a fork.
Importing Ray starts no thread; numpy's OpenBLAS and pyarrow's jemalloc each start one, and
both re-create them in a forked child (``pthread_atfork``), as prefork servers that preload them
rely on (150 forks, none stuck). Threads of your own in that parent that call numpy or pyarrow
while it forks are another matter: a child can wait forever on a Python lock such a thread held
(numpy's global random state, pyarrow's lazy imports), as with any module and threads and fork.

* The scheduler imports this module for its LocalExecutor (:func:`airflow_ray.listener.on_starting`,
  ``[ray] preload_in_scheduler``).
* A Celery worker imports it when its configuration lists it, before it forks its pool (add
  the entry to an ``extra_celery_config`` you already have)::

      [celery]
      extra_celery_config = {"imports": ["airflow_ray.preload"]}

Stability: stable (changes only in a major release, after a deprecation warning): the module path
is written into Airflow configurations.
"""

from __future__ import annotations

import ray

from airflow_ray import compat, outputs, tasks  # noqa: F401  (what a Ray task's process uses)
from airflow_ray.hooks import ray as _ray_hook  # noqa: F401

compat.import_driver_modules()

#: The Ray release loaded (logged by whoever preloads it).
RAY_VERSION: str = ray.__version__
