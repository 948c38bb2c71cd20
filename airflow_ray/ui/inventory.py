"""What the Ray view shows, gathered in one place: a DAG run's outputs, the cluster, and freeing a run.

Everything here is read from the source of truth, never from what a page sent:

* **a run's outputs** are its XCom rows in the metadata DB; a row that claims to be a reference
  is verified (:func:`airflow_ray.outputs.references_in`: signed by this deployment, unchanged)
  before any owner is asked about it, and the owners are only looked up, never created
  (:func:`airflow_ray.outputs.lookup`). A checkpoint counts as *verified* when its manifest is the
  one its writer recorded (format and digest, the check a restore makes before reading data);
* **the cluster** is asked as a driver through the XCom backend's connection (``[ray]
  xcom_conn_id``): the API server becomes a Ray driver on the first request, as ``airflow-ray gc``
  does;
* **freeing a run** goes through :func:`airflow_ray.outputs.release`, the path of the XCom
  backend's ``purge`` (the owners drop the entries; Ray frees an object with its last reference).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from airflow_ray import compat, config, outputs
from airflow_ray.exceptions import UntrustedReferenceError
from airflow_ray.references import ObjectReference

#: Where an output is: in the object store, in the XCom table, gone, or a row that failed verification.
IN_STORE, INLINE, NOT_HELD, UNTRUSTED = "object store", "inline", "not held", "untrusted"
#: Where a small object lives instead of a node's shared-memory store.
OWNER_MEMORY = "in its owner's memory (small object)"
#: The keys of a run's ``totals``.
TOTALS = (
    "outputs",
    "object_store",
    "object_store_bytes",
    "inline",
    "inline_bytes",
    "not_held",
    "checkpointed",
    "checkpoints_verified",
)
#: Airflow's own XComs beside task outputs: the URL of an operator's extra link.
_LINK_PREFIX = "_link_"
#: How long the view waits for one owner's or the cluster's answer.
_RAY_TIMEOUT_S = 10.0
#: The most runs the object-store chart shows (the newest).
MAX_CHART_RUNS = 30


class RunNotFoundError(LookupError):
    """No DAG run with this id."""


def run_outputs(dag_id: str, run_id: str) -> dict[str, Any]:
    """Every output a DAG run holds, one row per task instance and key, and the run's totals.

    :raises RunNotFoundError: no such run (the message names it).
    """
    rows = _xcom_rows(dag_id, run_id)
    listed: list[dict[str, Any]] = []
    references: dict[tuple[Any, ...], tuple[ObjectReference, dict[str, Any]]] = {}
    for task_id, map_index, key, value in rows:
        try:
            found = outputs.references_in(value)
        except UntrustedReferenceError as exc:
            listed.append(_row(task_id, map_index, key, where=UNTRUSTED, problem=str(exc)))
            continue
        if not found:
            text = json.dumps(value, default=str)
            listed.append(
                _row(task_id, map_index, key, where=INLINE, type=_json_type(value), bytes=len(text))
            )
        for reference in found:  # a multiple_outputs row repeats its keys' references: one row each
            if tuple(reference.entry_key) not in references:
                row = _reference_row(reference)
                references[tuple(reference.entry_key)] = (reference, row)
                listed.append(row)
    if references:
        _locate([ref for ref, _ in references.values()], [row for _, row in references.values()])
    listed.sort(key=lambda r: (r["task_id"], r["map_index"], r["key"]))
    return {"dag_id": dag_id, "run_id": run_id, "outputs": listed, "totals": _totals(listed)}


def cluster(readable: Callable[[str], bool]) -> dict[str, Any]:
    """Nodes, object store, this deployment's owners and keepers, and the object-store use of each
    run of a DAG that ``readable`` allows (newest first, at most :data:`MAX_CHART_RUNS`)."""
    import ray

    from airflow_ray import deployment, keeper
    from airflow_ray.owners import parse_owner_name, running_owner_names, worker_code_hash
    from airflow_ray.version import __version__

    target = outputs.connect()
    owners: list[dict[str, Any]] = []
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    for name in running_owner_names(deployment.current().id):
        parsed = parse_owner_name(name)
        entry: dict[str, Any] = {
            "name": name,
            "this_version": parsed is not None
            and (parsed.version, parsed.code) == (__version__, worker_code_hash()),
        }
        try:
            actor = ray.get_actor(name, namespace=config.namespace())
            stats: dict[str, Any]
            entries: list[dict[str, Any]]
            stats, entries = ray.get([actor.stats.remote(), actor.entries.remote()], timeout=_RAY_TIMEOUT_S)
        except Exception as exc:  # dead, restarting or stuck: that is the health to show
            owners.append({**entry, "healthy": False, "error": f"{type(exc).__name__}: {exc}"})
            continue
        owners.append({**entry, "healthy": True, **stats})
        for item in entries:
            dag_id, run_id = item["key"][:2]
            if readable(dag_id):
                run = runs.setdefault(
                    (dag_id, run_id), {"dag_id": dag_id, "run_id": run_id, "objects": 0, "bytes": 0}
                )
                run["objects"] += 1
                run["bytes"] += item.get("bytes", 0)
                run["created"] = max(run.get("created", 0.0), item["created"])
    newest = sorted(runs.values(), key=lambda r: r["created"], reverse=True)[:MAX_CHART_RUNS]
    return {
        "address": target.describe(),
        "dashboard_url": target.dashboard_url,
        "nodes": [_node(node) for node in ray.nodes()],
        "object_store": _object_store(target),
        "owners": owners,
        "keepers": keeper.describe(),
        "runs": newest,
    }


def free_run(dag_id: str, run_id: str) -> dict[str, Any]:
    """Free the objects a DAG run's XCom rows refer to; what was freed.

    Only verified references are acted on (a forged row is counted in ``untrusted`` and left
    alone). The rows stay: a task that reads a freed output later restores it from its checkpoint
    or fails naming the task to re-run, as after the TTL.

    :raises RunNotFoundError: no such run.
    """
    references: list[ObjectReference] = []
    untrusted = 0
    for *_, value in _xcom_rows(dag_id, run_id):
        try:
            references += outputs.references_in(value)
        except UntrustedReferenceError:
            untrusted += 1
    held = []
    if references:
        outputs.connect()
        found = outputs.lookup(references)
        held = [r for r, f in zip(references, found, strict=True) if not isinstance(f, outputs.NotHeld)]
    freed = outputs.release(held) if held else 0  # only what the XCom backend's cluster holds
    return {
        "dag_id": dag_id,
        "run_id": run_id,
        "freed_objects": freed,
        "freed_bytes": sum(int(r.summary.get("bytes", 0)) for r in held),
        "not_held": len(references) - len(held),
        "untrusted": untrusted,
    }


# --- private helpers -----------------------------------------------------------------------------


def _xcom_rows(dag_id: str, run_id: str) -> list[tuple[str, int, str, Any]]:
    """The run's XCom rows as (task_id, map_index, key, parsed value), Airflow's link rows left out."""
    from airflow.models.dagrun import DagRun
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        if not session.query(DagRun.id).filter_by(dag_id=dag_id, run_id=run_id).first():
            raise RunNotFoundError(f"DAG {dag_id!r} has no run {run_id!r}")
        rows = (
            session.query(XComModel.task_id, XComModel.map_index, XComModel.key, XComModel.value)
            .filter_by(dag_id=dag_id, run_id=run_id)
            .all()
        )
    return [
        (task_id, map_index, key, _parsed(value))
        for task_id, map_index, key, value in rows
        if not key.startswith(_LINK_PREFIX)
    ]


def _parsed(value: Any) -> Any:
    if isinstance(value, (str, bytes)):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _row(task_id: str, map_index: int, key: str, **fields: Any) -> dict[str, Any]:
    return {"task_id": task_id, "map_index": map_index, "key": key, **fields}


def _reference_row(reference: ObjectReference) -> dict[str, Any]:
    summary = reference.summary
    return _row(
        reference.task_id,
        reference.map_index,
        reference.key,
        type=summary.get("type"),
        shape=summary.get("shape"),
        rows=summary.get("rows"),
        bytes=summary.get("bytes"),
        object_id=reference.object_id,
        checkpoint_uri=reference.checkpoint_uri,
    )


def _locate(references: list[ObjectReference], rows: list[dict[str, Any]]) -> None:
    """Fill in where each referenced object is (node, or why it is not held) and its checkpoint."""
    import ray
    from ray.experimental import get_object_locations

    outputs.connect()
    found = outputs.lookup(references)
    held = [f for f in found if not isinstance(f, outputs.NotHeld)]
    try:
        locations = get_object_locations(held, timeout_ms=int(_RAY_TIMEOUT_S * 1000))
    except ray.exceptions.GetTimeoutError:
        locations = {}
    addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    for row, where in zip(rows, found, strict=True):
        if isinstance(where, outputs.NotHeld):
            row.update(where=NOT_HELD, problem=where.why)
            continue
        nodes = (locations.get(where) or {}).get("node_ids") or []
        if nodes:
            row.update(where=IN_STORE, node=nodes[0], node_address=addresses.get(nodes[0]))
        else:  # below ~100 KiB Ray keeps an object in its owner's process, not in a node's store
            row.update(where=IN_STORE, node=None, node_address=OWNER_MEMORY)
    checked = [(r, ref) for r, ref in zip(rows, references, strict=True) if ref.checkpoint_uri]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for (row, _), verdict in zip(
            checked, pool.map(_check_checkpoint, [ref for _, ref in checked]), strict=True
        ):
            row.update(verdict)


def _check_checkpoint(reference: ObjectReference) -> dict[str, Any]:
    """``checkpoint``: ``verified`` when the manifest is the one the producing task recorded."""
    from airflow_ray import checkpoint
    from airflow_ray._worker.checkpoint.io import check_manifest

    assert reference.checkpoint_uri is not None
    try:
        options = checkpoint.storage_options_for(reference.checkpoint_uri, reference.checkpoint_source)
        check_manifest(
            reference.checkpoint_uri,
            options,
            expected_format=reference.checkpoint_format,
            expected_digest=reference.checkpoint_digest,
        )
    except checkpoint.CheckpointNotFoundError as exc:
        return {"checkpoint": "missing", "checkpoint_problem": str(exc)}
    except checkpoint.CheckpointMismatchError as exc:
        return {"checkpoint": "mismatch", "checkpoint_problem": str(exc)}
    except Exception as exc:  # unreadable store, bad credentials: shown, not raised
        return {"checkpoint": "unreadable", "checkpoint_problem": f"{type(exc).__name__}: {exc}"}
    return {"checkpoint": "verified"}


def _totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    stored = [r for r in rows if r["where"] == IN_STORE]
    inline = [r for r in rows if r["where"] == INLINE]
    return {
        "outputs": len(rows),
        "object_store": len(stored),
        "object_store_bytes": sum(r.get("bytes") or 0 for r in stored),
        "inline": len(inline),
        "inline_bytes": sum(r["bytes"] for r in inline),
        "not_held": sum(r["where"] == NOT_HELD for r in rows),
        "checkpointed": sum(bool(r.get("checkpoint_uri")) for r in rows),
        "checkpoints_verified": sum(r.get("checkpoint") == "verified" for r in rows),
    }


def _json_type(value: Any) -> str:
    return {dict: "dict", list: "list", str: "str", bool: "bool", int: "int", float: "float"}.get(
        type(value), "null" if value is None else type(value).__name__
    )


def _node(node: dict[str, Any]) -> dict[str, Any]:
    resources = node.get("Resources", {})
    return {
        "id": node["NodeID"],
        "address": node["NodeManagerAddress"],
        "alive": bool(node["Alive"]),
        "cpus": resources.get("CPU", 0),
        "gpus": resources.get("GPU", 0),
        "memory_bytes": int(resources.get("memory", 0)),
        "object_store_bytes": int(resources.get("object_store_memory", 0)),
    }


def _object_store(target: Any) -> dict[str, Any]:
    """The cluster's object store use and spill, from its GCS and raylet (not through Ray Client)."""
    import ray

    if target.is_client:
        return {"unavailable": "not visible through Ray Client: see the Ray dashboard"}
    try:
        status = compat.cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as exc:
        return {"unavailable": f"{type(exc).__name__}: {exc}"}
    return {
        "used_bytes": status["object_store_used_bytes"],
        "capacity_bytes": status["object_store_capacity_bytes"],
        "objects": status["object_store_num_objects"],
        "spilled_bytes": status["object_store_spilled_bytes"],
    }
