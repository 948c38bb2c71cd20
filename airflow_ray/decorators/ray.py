"""``@ray_task`` / ``@task.ray``: put a decorator on a notebook function, run it on Ray.

.. code-block:: python

    from airflow.sdk import dag, task
    from airflow_ray import ray_task


    @dag(schedule=None)
    def etl():
        @task
        def extract() -> list[int]:
            return list(range(10))

        @ray_task(num_cpus=1, memory=512 * 1024**2)
        def transform(xs: list[int]) -> list[int]:
            return [x * x for x in xs]

        @task.ray(num_cpus=0.5)  # the same decorator, registered with Airflow
        def total(xs: list[int]) -> int:
            return sum(xs)

        total(transform(extract()))


    etl()

The function's real code runs on a Ray worker (closures, imports, DAG-folder helpers) and its
real return value flows to the next task. Every TaskFlow argument works (``task_id``,
``retries``, ``multiple_outputs``, ``pool``, ``execution_timeout``, ``.expand()``...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, overload

from airflow.sdk.bases.decorator import (
    DecoratedOperator,
    FParams,
    FReturn,
    Task,
    TaskDecorator,
    task_decorator_factory,
)

from airflow_ray._api import public_api
from airflow_ray.operators.python import RayPythonOperator


class _RayDecoratedOperator(DecoratedOperator, RayPythonOperator):
    """The operator ``@ray_task`` builds: TaskFlow argument capture + :class:`RayPythonOperator`."""

    custom_operator_name = "@task.ray"
    template_fields = RayPythonOperator.template_fields
    template_fields_renderers = RayPythonOperator.template_fields_renderers

    def __init__(self, *, python_callable: Callable[..., Any], op_args: Any, op_kwargs: Any, **kwargs: Any):
        super().__init__(
            kwargs_to_upstream={
                "python_callable": python_callable,
                "op_args": op_args,
                "op_kwargs": op_kwargs,
            },
            python_callable=python_callable,
            op_args=op_args,
            op_kwargs=op_kwargs,
            **kwargs,
        )


# The Task SDK types its own decorators in a stub (``airflow/sdk/definitions/decorators/__init__.pyi``);
# ``@task.ray`` gets no such types, so the importable ``ray_task`` carries them: bare, it keeps the
# function's parameters (``Task[FParams, FReturn]``); with options it returns a ``TaskDecorator``.
@overload
def ray_task(python_callable: Callable[FParams, FReturn]) -> Task[FParams, FReturn]: ...


@overload
def ray_task(
    python_callable: None = None,
    *,
    multiple_outputs: bool | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    memory: int | None = None,
    resources: dict[str, float] | None = None,
    runtime_env: dict[str, Any] | None = None,
    accelerator_type: str | None = None,
    max_retries: int | None = None,
    retry_exceptions: bool | list[type[BaseException]] | None = None,
    scheduling_strategy: Any = None,
    ray_conn_id: str = "ray_default",
    checkpoint: bool = False,
    checkpoint_source: str | None = None,
    checkpoint_path: str | None = None,
    **kwargs: Any,
) -> TaskDecorator: ...


@public_api("stable")
def ray_task(
    python_callable: Callable[..., Any] | None = None,
    multiple_outputs: bool | None = None,
    **kwargs: Any,
) -> Any:
    """Wrap a function into an Airflow task that runs on Ray.

    Bare (``@ray_task``) or with options (``@ray_task(num_cpus=2, checkpoint=True)``); the
    options are :class:`~airflow_ray.operators.RayPythonOperator`'s plus any operator argument.
    """
    return task_decorator_factory(
        python_callable=python_callable,
        multiple_outputs=multiple_outputs,
        decorated_operator_class=_RayDecoratedOperator,
        **kwargs,
    )
