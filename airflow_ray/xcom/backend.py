"""``RayXComBackend``: XCom values live in Ray's object store; the XCom table holds a reference.

Enable it with one environment variable::

    AIRFLOW__CORE__XCOM_BACKEND=airflow_ray.xcom.RayXComBackend

What is stored where (the rules live in :mod:`airflow_ray.outputs`):

* ``@ray_task`` outputs never leave Ray: the owner actor submitted the task, owns its return
  value, and the XCom row gets a small JSON reference (owner, key, object id, type, shape or
  rows, bytes, checkpoint URI), e.g.
  ``{"__airflow_ray__": 1, "object_id": "…", "summary": {"type": "pandas…DataFrame", "rows": 10000, …}}``.
* Outputs of either kind of task that are JSON-like and smaller than ``[ray] xcom_threshold_bytes``
  are stored in the table as Airflow always does; larger plain ``@task`` outputs (or ones that are
  not JSON-like, like a fitted model) are adopted by the owner, and the row gets a reference.
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

from airflow_ray._api import public_api

log = logging.getLogger(__name__)

#: The marker of a stored reference (see :data:`airflow_ray.references.MARKER`).
_MARKER = "__airflow_ray__"


@public_api("stable")
class RayXComBackend(BaseXCom):
    """XCom backend storing values in Ray's object store and references in the XCom table.

    The stored reference format is versioned (:data:`airflow_ray.references.REFERENCE_FORMAT_VERSION`).
    """

    _airflow_ray_backend = True  # how airflow_ray.outputs recognises us (and subclasses)

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
        from airflow_ray import outputs
        from airflow_ray._worker.keys import TaskKey

        task = TaskKey(dag_id, run_id, task_id, -1 if map_index is None else map_index)  # type: ignore[arg-type]
        return outputs.to_xcom(value, key=key, task=task)

    @staticmethod
    def deserialize_value(result: Any) -> Any:
        from airflow_ray import outputs

        value = outputs.from_xcom(_load(result.value))
        return BaseXCom.deserialize_value(result) if value is outputs.NOT_OURS else value

    @classmethod
    def purge(cls, xcom: Any, *args: Any) -> None:
        """Free the objects behind an XCom that Airflow is deleting (e.g. before a retry)."""
        from airflow_ray import outputs

        try:  # only verified references: a forged row must not free another task's objects
            references = outputs.references_in(_load(getattr(xcom, "value", None)))
            if references:
                outputs.release(references)
        except Exception:  # cleanup must never fail the task that triggered it
            log.warning("Could not free the Ray objects of an XCom being deleted", exc_info=True)


def _load(value: Any) -> Any:
    """XCom values reach us parsed, but tolerate a JSON string (older API server responses)."""
    if isinstance(value, str) and value.startswith("{") and _MARKER in value:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
