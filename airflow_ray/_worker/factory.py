"""The actor that creates owner actors inside the keeper's Ray job, for any deployment.

A detached actor belongs to the Ray job of whoever created it, and Ray keeps idle worker
processes only for jobs that are still running. An owner created by an Airflow task process
belongs to a job that ends with the task, so every later ``@ray_task`` it runs waits for a new
worker process (1.7-2.5 s measured on a loaded 2-core machine). The keeper
(:mod:`airflow_ray.keeper`) is a driver that stays connected; this actor, which the keeper
creates, is in its job, and so is every actor it creates. Task processes of any deployment ask
it for their owners instead of creating them.
"""

from __future__ import annotations

from typing import Any


class OwnerFactory:
    """Creates named detached actors in this actor's (the keeper's) Ray job."""

    def create(self, cls: type, options: dict[str, Any], args: tuple[Any, ...]) -> None:
        """Create ``cls`` with ``options`` (a name, ``get_if_exists``) and wait until it answers."""
        import ray

        handle: Any = ray.remote(cls).options(**options).remote(*args)
        ray.get(handle.__ray_ready__.remote())
