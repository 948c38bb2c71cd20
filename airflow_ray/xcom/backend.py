"""``RayXComBackend``: XCom values live in Ray's object store; the XCom table holds a reference.

Enable it with one environment variable::

    AIRFLOW__CORE__XCOM_BACKEND=airflow_ray.xcom.RayXComBackend

What is stored where:

* ``@ray_task`` outputs never leave Ray: the owner actor submitted the task, owns its return
  value, and the XCom row gets a small JSON reference (owner, key, object id, type, shape or
  rows, bytes, checkpoint URI), e.g.
  ``{"__airflow_ray__": 1, "object_id": "…", "summary": {"type": "pandas…DataFrame", "rows": 10000, …}}``.
* Plain ``@task`` outputs smaller than ``[ray] xcom_threshold_bytes`` are stored in the table as
  Airflow always does; larger ones (or ones Airflow cannot serialize, like a fitted model) are
  adopted by the owner, and the row gets a reference.
* Readers: a ``@ray_task`` consumer receives a handle that its Ray worker resolves (zero-copy on
  the same node; the Airflow process never loads the data); a plain ``@task`` receives the value.

When data is freed: see ``docs/xcom.md``. In short: when the task is re-run (its old objects
are replaced), when its XCom is cleared, when ``airflow-ray gc`` finds the run deleted, and after
``[ray] object_ttl_seconds``.

This module is imported by Airflow while Airflow itself is initialising: keep module-level
imports to the standard library and ``BaseXCom``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk.bases.xcom import BaseXCom

from airflow_ray.store import MARKER, ObjectReference

#: Key of the ``return_value`` XCom of a ``multiple_outputs`` task: ``{OUTPUTS: {key: stored}}``.
OUTPUTS = "__airflow_ray_outputs__"

log = logging.getLogger(__name__)

#: The connection the backend uses for plain tasks (which have no ``ray_conn_id`` of their own).
XCOM_RAY_CONN_ID = "ray_default"

#: ``(task key, (checkpoint_path, checkpoint_source) or None)`` of the task this process runs.
_checkpoint_request: tuple[tuple[Any, ...], tuple[str | None, str | None] | None] | None = None

#: Values this process pushed per task, by key (see :func:`_pushed_outputs`).
_recent_pushes: dict[tuple[Any, ...], dict[str, tuple[Any, Any]]] = {}


class RayXComBackend(BaseXCom):
    """XCom backend storing values in Ray's object store and references in the XCom table."""

    @staticmethod
    def serialize_value(
        value: Any,
        *,
        key: str | None = None,
        task_id: str | None = None,
        dag_id: str | None = None,
        run_id: str | None = None,
        map_index: int | None = None,
    ) -> Any:
        from airflow_ray.store import RayResult

        if isinstance(value, RayResult):
            return value.reference.to_json()
        if isinstance(value, dict) and any(isinstance(v, RayResult) for v in value.values()):
            return {  # a @ray_task's multiple_outputs: references, and small values inline
                OUTPUTS: {
                    k: v.reference.to_json() if isinstance(v, RayResult) else BaseXCom.serialize_value(v)
                    for k, v in value.items()
                }
            }
        task_key = (dag_id, run_id, task_id, -1 if map_index is None else map_index)
        if (outputs := _pushed_outputs(task_key, key, value)) is not None:
            return outputs
        stored = _inline_or_none(value)
        if stored is None:
            if None in task_key or key is None:
                raise ValueError("RayXComBackend needs the XCom's key, task_id, dag_id and run_id")
            stored = _adopt(value, key, *task_key)
        if task_key not in _recent_pushes:
            _recent_pushes.clear()  # only the task this process is finishing matters
        _recent_pushes.setdefault(task_key, {})[key] = (value, stored)
        return stored

    @staticmethod
    def deserialize_value(result: Any) -> Any:
        data = _load(result.value)
        if ObjectReference.is_reference(data):
            return _materialize([ObjectReference.from_json(data)])[0]
        if _is_outputs(data):
            items = data[OUTPUTS]
            refs = {
                k: ObjectReference.from_json(v) for k, v in items.items() if ObjectReference.is_reference(v)
            }
            values = dict(zip(refs, _materialize(list(refs.values())), strict=True)) if refs else {}
            return {
                k: values[k] if k in values else BaseXCom.deserialize_value(_Stored(v))
                for k, v in items.items()
            }
        return BaseXCom.deserialize_value(result)

    @classmethod
    def purge(cls, xcom: Any, *args: Any) -> None:
        """Free the objects behind an XCom that Airflow is deleting (e.g. before a retry)."""
        references = references_in(_load(getattr(xcom, "value", None)))
        if not references:
            return
        try:
            release(references)
        except Exception:  # cleanup must never fail the task that triggered it
            log.warning("Could not free Ray objects of %s", references[0].describe(), exc_info=True)


def references_in(data: Any) -> list[ObjectReference]:
    """The Ray references in a stored XCom value (one, or one per key of multiple_outputs)."""
    if ObjectReference.is_reference(data):
        return [ObjectReference.from_json(data)]
    if _is_outputs(data):
        return [
            ObjectReference.from_json(v) for v in data[OUTPUTS].values() if ObjectReference.is_reference(v)
        ]
    return []


def release(references: list[ObjectReference]) -> None:
    """Ask the owners to drop the given entries (their objects are freed)."""
    import ray

    from airflow_ray.hooks import RayHook
    from airflow_ray.store import get_owner

    RayHook(references[0].ray_conn_id).connect()
    ray.get([get_owner(r.owner).release.remote(r.entry_key) for r in references], timeout=30)


# --- private helpers -----------------------------------------------------------------------


def _load(value: Any) -> Any:
    """XCom values reach us parsed, but tolerate a JSON string (older API server responses)."""
    if isinstance(value, str) and value.startswith("{") and MARKER in value:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _is_outputs(data: Any) -> bool:
    return isinstance(data, dict) and len(data) == 1 and isinstance(data.get(OUTPUTS), dict)


class _Stored:
    """The shape ``BaseXCom.deserialize_value`` expects: an object with ``.value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _inline_or_none(value: Any) -> Any:
    """Airflow's own serialization if the value is small enough for the table, else None."""
    from airflow_ray import config
    from airflow_ray._worker.runner import is_dataset

    threshold = config.xcom_threshold_bytes()
    if value is None:
        return BaseXCom.serialize_value(value)
    if is_dataset(value):  # its blocks belong in the object store, however small
        return None
    size = _known_size(value)
    if size is not None and size >= threshold:
        return None
    try:
        serialized = BaseXCom.serialize_value(value)
    except Exception:  # Airflow cannot store it (a model, a custom class): Ray can
        return None
    if len(json.dumps(serialized, default=str)) >= threshold:
        return None
    return serialized


def _known_size(value: Any) -> int | None:
    """Bytes of array-like values without serializing them (serde of a 50 MB frame takes ~9 s)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value)
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    memory_usage = getattr(value, "memory_usage", None)
    if callable(memory_usage) and hasattr(value, "columns"):
        return int(memory_usage(index=True, deep=False).sum())
    return None


def _pushed_outputs(task_key: tuple[Any, ...], key: str | None, value: Any) -> dict[str, Any] | None:
    """For a plain ``multiple_outputs`` task, the whole dict refers to the per-key XComs.

    Airflow pushes every key, then the whole dict as ``return_value``; storing that dict
    again would adopt every large value twice.
    """
    pushed = _recent_pushes.pop(task_key, None) if key == BaseXCom.XCOM_RETURN_KEY else None
    if not pushed or not isinstance(value, dict) or set(value) != set(pushed):
        return None
    if any(pushed[k][0] is not v for k, v in value.items()):
        return None
    stored = {k: pushed[k][1] for k in value}
    return {OUTPUTS: stored} if any(ObjectReference.is_reference(v) for v in stored.values()) else None


def _adopt(value: Any, key: str, dag_id: str, run_id: str, task_id: str, map_index: int) -> dict[str, Any]:
    import ray

    from airflow_ray._worker.runner import is_dataset, summarize
    from airflow_ray.hooks import RayHook
    from airflow_ray.store import get_owner, owner_name

    RayHook(XCOM_RAY_CONN_ID).connect()
    name = owner_name(dag_id, run_id)
    summary = summarize(value)
    entry_key = (dag_id, run_id, task_id, map_index, key)
    owner = get_owner(name, create=True)
    if is_dataset(value):  # its blocks are owned by this process: the owner copies them
        adopted = owner.adopt_blocks.remote(entry_key, summary, *value.to_arrow_refs())
    else:
        adopted = owner.adopt.remote(entry_key, value, summary)
    object_id = ray.get(adopted)
    reference = ObjectReference(
        owner=name,
        dag_id=dag_id,
        run_id=run_id,
        task_id=task_id,
        map_index=map_index,
        key=key,
        object_id=object_id,
        summary=summary,
        ray_conn_id=XCOM_RAY_CONN_ID,
    )
    if _checkpoint_request and _checkpoint_request[0] == (dag_id, run_id, task_id, map_index):
        settings = _checkpoint_request[1]
    else:
        settings = None
    if settings is not None:
        from airflow_ray.checkpoint import persist

        path, source = settings
        reference = persist({key: reference}, checkpoint_path=path, checkpoint_source=source)[key]
    return reference.to_json()


def task_starting(ti: Any) -> None:
    """Called by :mod:`airflow_ray.listener` inside the task's context, before it runs."""
    global _checkpoint_request
    task_key = (ti.dag_id, ti.run_id, ti.task_id, ti.map_index)
    _checkpoint_request = (task_key, _checkpoint_settings())


def _checkpoint_settings() -> tuple[str | None, str | None] | None:
    """``(checkpoint_path, checkpoint_source)`` if the running plain task asks for checkpoints.

    ``@task`` has no ``checkpoint`` argument, so a plain task takes it from ``default_args``
    of its DAG or of a TaskGroup around it, the way ``@ray_task`` tasks get DAG-wide defaults.
    Needs the task's context (see :func:`task_starting`).
    """
    try:
        from airflow.sdk import get_current_context

        context = get_current_context()
    except Exception:
        return None
    task = context["task"]
    if getattr(task, "_airflow_ray_consumer", False):
        return None  # a Ray task checkpoints its own outputs
    args = dict(getattr(context["dag"], "default_args", None) or {})
    groups = []
    group = getattr(task, "task_group", None)
    while group is not None:
        groups.append(group)
        group = getattr(group, "parent_group", None)
    for group in reversed(groups):  # the innermost group wins
        args.update(getattr(group, "default_args", None) or {})
    if not args.get("checkpoint"):
        return None
    path = args.get("checkpoint_path")
    if path:
        path = task.render_template(path, context)
    return path, args.get("checkpoint_source")


def _materialize(references: list[ObjectReference]) -> list[Any]:
    """Handles for a Ray consumer, values for everyone else."""
    from airflow_ray.store import handle_for

    if _consumer_is_ray_task():
        return [handle_for(r) for r in references]
    import ray

    from airflow_ray import tasks
    from airflow_ray._worker.runner import as_dataset
    from airflow_ray.hooks import RayHook

    RayHook(references[0].ray_conn_id).connect()
    values = []
    for reference, ref in zip(references, tasks.resolve(references), strict=True):
        try:
            value = ray.get(ref)
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            # listed by its owner but lost (e.g. its node died): the checkpoint, or a clear error
            value = ray.get(tasks.restore(reference, type(exc).__name__))
        values.append(as_dataset(value) if reference.summary.get("dataset") else value)
    return values


def _consumer_is_ray_task() -> bool:
    """Is the task whose arguments Airflow is rendering right now a Ray task?

    Airflow resolves XComArgs while rendering template fields, inside ``set_current_context``;
    for a mapped task the context's task is still the MappedOperator, whose ``operator_class``
    tells what it will become.
    """
    try:
        from airflow.sdk import get_current_context

        task = get_current_context()["task"]
    except Exception:
        return False
    cls = getattr(task, "operator_class", None) or type(task)
    return bool(getattr(cls, "_airflow_ray_consumer", False))
