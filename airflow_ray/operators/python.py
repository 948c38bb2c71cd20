"""``RayPythonOperator``: run a Python callable on Ray, with Ray's own option names.

Most users write ``@ray_task`` (:mod:`airflow_ray.decorators`), which builds this operator.

.. code-block:: python

    from airflow_ray.operators import RayPythonOperator

    RayPythonOperator(task_id="train", python_callable=train, op_args=[data], num_cpus=2)
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import date, datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.python import PythonOperator

from airflow_ray import assets, config
from airflow_ray._api import public_api
from airflow_ray._worker.keys import TaskInstanceInfo, TaskKey
from airflow_ray.hooks import RayHook
from airflow_ray.lineage import RayLineage, RayLineageMixin, output_entry
from airflow_ray.links.dashboard import RayDashboardLink, owner_url
from airflow_ray.references import RayResult

if TYPE_CHECKING:
    from airflow.sdk import Context

#: Options handed to ``ray.remote(...).options(...)`` under the names Ray uses.
RAY_OPTIONS = (
    "num_cpus",
    "num_gpus",
    "memory",
    "resources",
    "runtime_env",
    "accelerator_type",
    "max_retries",
    "retry_exceptions",
    "scheduling_strategy",
)
_ATTRIBUTE = {"resources": "ray_resources"}
_PORTABLE = (str, int, float, bool, type(None), datetime, date, timedelta)


@public_api("beta")
class RayPythonOperator(RayLineageMixin, PythonOperator):
    """Runs ``python_callable`` as a Ray task; its return value becomes the XCom.

    With :class:`~airflow_ray.xcom.RayXComBackend` the return value stays in Ray's object store
    (owned by a detached owner actor) and only a small JSON reference goes to the XCom table;
    with any other backend it is fetched and stored as usual. With the OpenLineage provider, its
    run events say what ran where on Ray and which checkpoints it read and wrote
    (:mod:`airflow_ray.lineage`).

    :param num_cpus: CPUs reserved for the task (Ray's default: 1).
    :param num_gpus: GPUs reserved for the task.
    :param memory: bytes of memory reserved for the task (for scheduling, not a limit).
    :param resources: custom resources, e.g. ``{"trainer": 1}``.
    :param runtime_env: Ray runtime environment, merged over the connection's.
    :param accelerator_type: e.g. ``"A100"`` (Ray's ``accelerator_type`` option).
    :param max_retries: Ray-level retries after a worker crash (Airflow's ``retries`` re-run the task).
    :param retry_exceptions: Ray-level retries on exceptions (``True`` or a list of types).
    :param scheduling_strategy: ``"SPREAD"``, ``"DEFAULT"`` or a Ray scheduling strategy object.
    :param ray_conn_id: Airflow connection of type ``ray`` (see :class:`~airflow_ray.hooks.RayHook`).
    :param checkpoint: also persist the output to object storage, so it survives the cluster.
    :param checkpoint_source: Airflow connection whose bucket/prefix and credentials hold checkpoints.
    :param checkpoint_path: base URI for checkpoints, e.g. ``s3://bucket/prefix`` or ``file:///path``.
    """

    template_fields: Sequence[str] = (*PythonOperator.template_fields, "ray_conn_id", "checkpoint_path")
    _airflow_ray_consumer = True  # the XCom backend hands this operator handles, not values
    operator_extra_links = (RayDashboardLink(),)
    ray_dashboard_link: str | None = None  # the run's owner actor in the Ray dashboard

    def __init__(
        self,
        *,
        python_callable: Callable[..., Any],
        op_args: Collection[Any] | None = None,
        op_kwargs: Mapping[str, Any] | None = None,
        num_cpus: float | None = None,
        num_gpus: float | None = None,
        memory: int | None = None,
        resources: dict[str, float] | None = None,
        runtime_env: dict[str, Any] | None = None,
        accelerator_type: str | None = None,
        max_retries: int | None = None,
        retry_exceptions: bool | list[type[BaseException]] | None = None,
        scheduling_strategy: Any = None,
        ray_conn_id: str = RayHook.default_conn_name,
        checkpoint: bool = False,
        checkpoint_source: str | None = None,
        checkpoint_path: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(python_callable=python_callable, op_args=op_args, op_kwargs=op_kwargs, **kwargs)
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus), ("memory", memory)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r} (task '{self.task_id}')")
        if resources is not None:
            if not isinstance(resources, dict):
                raise TypeError(f"resources must be a dict, got {type(resources).__name__}")
            reserved = {"CPU", "GPU", "memory"} & set(resources)
            if reserved:
                raise ValueError(
                    f"Use num_cpus / num_gpus / memory instead of resources={sorted(reserved)} "
                    f"(task '{self.task_id}')"
                )
        if runtime_env is not None and not isinstance(runtime_env, dict):
            raise TypeError(f"runtime_env must be a dict, got {type(runtime_env).__name__}")
        if (checkpoint_source or checkpoint_path) and not checkpoint:
            warnings.warn(
                f"Task '{self.task_id}': checkpoint_source/checkpoint_path are ignored without "
                "checkpoint=True",
                UserWarning,
                stacklevel=3,
            )
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.memory = memory
        self.ray_resources = resources  # BaseOperator.resources means something else
        self.runtime_env = runtime_env
        self.accelerator_type = accelerator_type
        self.max_retries = max_retries
        self.retry_exceptions = retry_exceptions
        self.scheduling_strategy = scheduling_strategy
        self.ray_conn_id = ray_conn_id
        self.checkpoint = checkpoint
        self.checkpoint_source = checkpoint_source
        self.checkpoint_path = checkpoint_path
        if (declared := assets.declared(self.outlets)) and not checkpoint:
            raise assets.not_checkpointed_error(self.task_id, declared)
        self._running = False
        self.ray_lineage = RayLineage(kind="task", resources=_describe(self.ray_options()))

    def execute(self, context: Context) -> Any:
        ti = context["ti"]
        self._task_key = TaskKey(
            ti.dag_id, ti.run_id, ti.task_id, -1 if ti.map_index is None else ti.map_index
        )
        self._context_keys = set(context)
        self._identity = TaskInstanceInfo(*self._task_key, try_number=ti.try_number)
        self._outlet_events = context["outlet_events"]
        return super().execute(context)

    def execute_callable(self) -> Any:
        from airflow_ray import outputs, tasks
        from airflow_ray.owners import owner_name

        lineage = self.ray_lineage
        declared = assets.declared(self.outlets)
        if declared and not outputs.ray_xcom_enabled():
            raise ValueError(
                f"Task '{self.task_id}' declares checkpoint assets, and only outputs kept in Ray's "
                "object store are checkpointed: set AIRFLOW__CORE__XCOM_BACKEND="
                "airflow_ray.xcom.RayXComBackend, or use a plain Asset."
            )
        target = RayHook(self.ray_conn_id).connect()
        owner = owner_name(self._task_key.dag_id, self._task_key.run_id)
        lineage.owner, lineage.dashboard_url = owner, target.dashboard_url
        request = tasks.TaskRequest(
            fn=self.python_callable,
            args=tuple(self.op_args),
            kwargs=self._portable_kwargs(dict(self.op_kwargs)),
            task_key=self._task_key,
            options=self.ray_options(target.runtime_env),
            split="keys" if self.multiple_outputs else None,
            infeasible_timeout=config.infeasible_task_timeout(),
            inline_limit=0 if declared else outputs.inline_limit(),  # an asset needs a checkpoint
        )
        lineage.read = [h.reference for h in tasks.extract_handles((request.args, request.kwargs))[1]]
        self._running = True
        try:
            reply = tasks.run(request, self.log)
        finally:
            self._running = False
            self.ray_dashboard_link = lineage.page_url = owner_url(target.dashboard_url, owner)
        lineage.node_id = reply.get("node_id")
        lineage.outputs = [output_entry(o["key"], o["summary"], o.get("object_id")) for o in reply["outputs"]]
        checkpoint = outputs.CheckpointSettings(
            self.checkpoint_path, self.checkpoint_source, declared, self._outlet_events
        )
        result = outputs.publish(
            self._task_key,
            reply,
            ray_conn_id=self.ray_conn_id,
            checkpoint=checkpoint if self.checkpoint else None,
            multiple_outputs=bool(self.multiple_outputs),
        )
        values = result.values() if self.multiple_outputs else [result]
        lineage.written = [value.reference for value in values if isinstance(value, RayResult)]
        return result

    def on_kill(self) -> None:
        """Airflow is killing this task: cancel the Ray task too (no orphaned work)."""
        if self._running:
            from airflow_ray import tasks

            tasks.cancel(self._task_key, self.log)

    def ray_options(self, connection_runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
        """The ``.options(...)`` for the Ray task: our arguments, under Ray's names."""
        options = {name: getattr(self, _ATTRIBUTE.get(name, name)) for name in RAY_OPTIONS}
        options = {name: value for name, value in options.items() if value is not None}
        runtime_env = _merge_runtime_env(connection_runtime_env or {}, self.runtime_env or {})
        if runtime_env:
            options["runtime_env"] = runtime_env
        return options

    def _portable_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Only context values that can travel to a Ray worker.

        ``ti``/``task_instance`` become a read-only snapshot (``dag_id``, ``run_id``,
        ``task_id``, ``map_index``, ``try_number``); ``params`` a plain dict. A context value
        the function names explicitly but that cannot travel is an error; under ``**kwargs``
        such values are left out.
        """
        explicit = set(inspect.signature(self.python_callable).parameters)
        for key in [k for k in kwargs if k in self._context_keys]:
            value = self._portable(key, kwargs[key])
            if value is not _NOT_PORTABLE:
                kwargs[key] = value
            elif key in explicit:
                raise TypeError(
                    f"Task '{self.task_id}': the context value '{key}' cannot be sent to a Ray worker. "
                    "Read what you need from it in a plain @task and pass that instead."
                )
            else:
                del kwargs[key]
        return kwargs

    def _portable(self, key: str, value: Any) -> Any:
        if key in ("ti", "task_instance"):
            return self._identity
        if key == "params":
            return dict(value)
        if isinstance(value, datetime):  # pendulum's subclass drags Airflow into the worker
            return datetime.fromisoformat(value.isoformat())
        if isinstance(value, _PORTABLE):
            return value
        return _NOT_PORTABLE


_NOT_PORTABLE = object()


def _describe(options: dict[str, Any]) -> dict[str, Any]:
    """Requested resources for lineage: JSON values (a scheduling strategy object becomes its
    repr); ``runtime_env`` is left out (its ``env_vars`` may hold secrets)."""
    return {
        name: value if isinstance(value, (str, int, float, bool, dict)) else repr(value)
        for name, value in options.items()
        if name != "runtime_env"
    }


def _merge_runtime_env(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Task runtime_env over the connection's; ``env_vars`` are merged key by key."""
    merged = {**base, **override}
    if "env_vars" in base and "env_vars" in override:
        merged["env_vars"] = {**base["env_vars"], **override["env_vars"]}
    return merged
