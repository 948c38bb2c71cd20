"""Task outputs on the Airflow side: where a return value goes, and how its consumers get it.

This module alone decides what happens to a task's return value once it exists, for ``@ray_task``
and plain ``@task`` alike:

* **Keep or inline** (:func:`stays_inline`, one rule): a value that is JSON-like and smaller than
  ``[ray] xcom_threshold_bytes`` is stored in the XCom table as Airflow always does; anything
  else stays in (``@ray_task``) or goes to (plain task: *adopted*) Ray's object store, owned by
  the run's owner actor, and the XCom row gets a small :class:`~airflow_ray.references.ObjectReference`.
* **Publish** (:func:`publish`): turns the owner's reply for a ``@ray_task`` into what Airflow
  pushes, after persisting checkpoints of kept outputs (:func:`persist`).
* **Serialize / deserialize** (:func:`to_xcom`, :func:`from_xcom`): what the XCom backend stores
  and what a consumer receives: a handle for a ``@ray_task`` consumer (its Ray worker resolves
  it, zero-copy on the same node), the value for a plain one.
* **Resolve and recover** (:func:`resolve`, :func:`recover`): ObjectRefs for references; an
  output its owner no longer holds, or the cluster lost, is restored from its checkpoint or
  reported with a clear error naming the task to re-run.
* **Release** (:func:`release`): frees outputs whose XCom rows are going away.

The path of a ``@ray_task``'s return value: ``runner.execute`` (Ray worker) yields it ->
``Owner.run`` registers it and replies -> :func:`publish` -> ``RayXComBackend.serialize_value``
-> :func:`to_xcom` -> XCom row; a consumer: ``RayXComBackend.deserialize_value`` ->
:func:`from_xcom` -> a handle -> ``tasks.run`` -> :func:`resolve` -> ``Owner.run``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from airflow_ray import config, deployment
from airflow_ray._worker.checkpoint.formats import PICKLE
from airflow_ray._worker.keys import TaskKey
from airflow_ray._worker.runner import as_dataset, is_dataset, is_plain, summarize
from airflow_ray.exceptions import RayObjectLostError
from airflow_ray.owners import forget_owners, get_owner, owner_name
from airflow_ray.references import ObjectReference, RayResult, handle_for, result_for

if TYPE_CHECKING:
    from airflow_ray.assets import CheckpointAsset
    from airflow_ray.checkpoint import CheckpointLocation
    from airflow_ray.hooks.ray import RayTarget

#: Key of the ``return_value`` XCom of a ``multiple_outputs`` task: ``{OUTPUTS: {key: stored}}``.
OUTPUTS = "__airflow_ray_outputs__"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    """A task's ``checkpoint_path`` / ``checkpoint_source`` (given, or from ``default_args``), and
    the checkpoint assets in its outlets with the task instance's outlet events, which
    :func:`persist` fills (see :mod:`airflow_ray.assets`)."""

    path: str | None = None
    source: str | None = None
    assets: tuple[CheckpointAsset, ...] = ()
    outlet_events: Any = dataclasses.field(default=None, repr=False, compare=False)


#: The plain task this process runs: its key, checkpoint settings (None: it does not checkpoint) and
#: the checkpoint assets in its outlets (see :func:`task_starting`).
_plain_task: tuple[TaskKey, CheckpointSettings | None, tuple[CheckpointAsset, ...]] | None = None

#: Values this process pushed per task, by key (see :func:`_pushed_outputs`).
_recent_pushes: dict[TaskKey, dict[str | None, tuple[Any, Any]]] = {}


# --- the rule ------------------------------------------------------------------------------------


def stays_inline(value: Any) -> bool:
    """The one keep-or-inline rule: JSON-like and below ``[ray] xcom_threshold_bytes`` -> XCom table.

    A ``@ray_task``'s worker applies the same rule through the summary it computes
    (``plain`` and ``bytes``, see :func:`inline_limit`), so both kinds of task agree.
    """
    if value is None:
        return True
    return is_plain(value) and len(json.dumps(value, default=str)) < config.xcom_threshold_bytes()


def inline_limit() -> int | None:
    """What a ``@ray_task``'s owner should send back as values rather than keep.

    With the Ray XCom backend: outputs that :func:`stays_inline` would keep in the table (JSON-like
    and below the threshold). With any other backend every output comes back as its value, and
    Airflow's XCom stores it.
    """
    return config.xcom_threshold_bytes() if ray_xcom_enabled() else None


def connect() -> RayTarget:
    """This process as a driver of the cluster that holds the outputs: the one of the XCom
    backend's connection (``[ray] xcom_conn_id``), whoever asks (a task, ``gc``, the UI).

    Every caller goes through here because Ray's own fallback is silently wrong: a Ray API called
    before ``ray.init`` starts a new, empty local cluster and answers from it.
    """
    from airflow_ray.hooks.ray import RayHook

    return RayHook(config.xcom_conn_id()).connect()


def ray_xcom_enabled() -> bool:
    """Is :class:`~airflow_ray.xcom.RayXComBackend` (or a subclass) Airflow's XCom backend?"""
    from airflow.sdk.execution_time.xcom import XCom

    return bool(getattr(XCom, "_airflow_ray_backend", False))


# --- producing -----------------------------------------------------------------------------------


def publish(
    task: TaskKey,
    reply: dict[str, Any],
    *,
    ray_conn_id: str,
    checkpoint: CheckpointSettings | None,
    multiple_outputs: bool,
) -> Any:
    """What a ``@ray_task`` returns to Airflow, from its owner's reply (:func:`airflow_ray.tasks.run`).

    Kept outputs become :class:`~airflow_ray.references.RayResult` (the XCom backend stores their
    reference), checkpointed first when the task asks for it; small ones are the values themselves.
    """
    owner = owner_name(task.dag_id, task.run_id)
    kept = {
        out["key"]: _reference(task, out, owner=owner, ray_conn_id=ray_conn_id)
        for out in reply["outputs"]
        if "ref" in out
    }
    if checkpoint is not None and kept:  # values kept in the XCom table are durable already
        refs = {out["key"]: out["ref"][0] for out in reply["outputs"] if "ref" in out}
        kept = persist(kept, refs, checkpoint, node_id=reply.get("node_id"))
    results = {
        out["key"]: result_for(kept[out["key"]]) if out["key"] in kept else out["value"]
        for out in reply["outputs"]
    }
    return results if multiple_outputs else results["return_value"]


def to_xcom(value: Any, *, key: str | None, task: TaskKey) -> Any:
    """What the XCom table stores for ``value`` (``RayXComBackend.serialize_value``)."""
    from airflow.sdk.bases.xcom import BaseXCom

    if isinstance(value, RayResult):
        return _stored(value.reference)
    if isinstance(value, dict) and any(isinstance(v, RayResult) for v in value.values()):
        return {  # a @ray_task's multiple_outputs: references, and small values inline
            OUTPUTS: {
                k: _stored(v.reference) if isinstance(v, RayResult) else BaseXCom.serialize_value(v)
                for k, v in value.items()
            }
        }
    if (pushed := _pushed_outputs(task, key, value)) is not None:
        return pushed
    stored: Any
    settings = _plain_checkpoint(task)
    if stays_inline(value) and not (settings and settings.assets):  # an asset needs a checkpoint
        stored = BaseXCom.serialize_value(value)
    else:
        if None in task or key is None:
            raise ValueError("RayXComBackend needs the XCom's key, task_id, dag_id and run_id")
        stored = _stored(adopt(value, key, task, settings))
    if task not in _recent_pushes:
        _recent_pushes.clear()  # only the task this process is finishing matters
    _recent_pushes.setdefault(task, {})[key] = (value, stored)
    return stored


def adopt(value: Any, key: str, task: TaskKey, settings: CheckpointSettings | None) -> ObjectReference:
    """Hand a plain task's output to its run's owner, checkpointed if ``settings`` say so."""
    import ray

    ray_conn_id = config.xcom_conn_id()
    connect()
    name = owner_name(task.dag_id, task.run_id)
    summary = summarize(value)
    owner = get_owner(name, create=True)
    if is_dataset(value):  # its blocks are owned by this process: the owner copies them
        reply = ray.get(owner.adopt_blocks.remote(task.output(key), summary, *value.to_arrow_refs()))
    else:
        reply = ray.get(owner.adopt.remote(task.output(key), value, summary))
    reference = _reference(
        task, {"key": key, "summary": summary, **reply}, owner=name, ray_conn_id=ray_conn_id
    )
    if settings is not None:
        reference = persist({key: reference}, {key: reply["ref"][0]}, settings, node_id=reply["node_id"])[key]
    return reference


def persist(
    references: dict[str, ObjectReference],
    refs: dict[str, Any],
    settings: CheckpointSettings,
    *,
    node_id: str | None = None,
) -> dict[str, ObjectReference]:
    """Checkpoint one task instance's kept outputs before the task succeeds.

    Each write is a Ray task that the run's owner submits (:meth:`Owner.write_checkpoints
    <airflow_ray._worker.owner.Owner.write_checkpoints>`: its warm workers, not a new one for this
    process's Ray job) and that receives the output's ObjectRef, preferably on the node that
    produced it (``node_id``), so the data goes from the object store to storage without passing
    through this process. One directory per task instance (``<base>/<dag>/<run>/<task>/<map_index>/``,
    one subdirectory per key of ``multiple_outputs``) with stable names: a retry overwrites, never
    piles up. The first write under a base marks it as this deployment's, and a base another
    deployment marked is refused (:func:`airflow_ray.checkpoint.claim_base`). Returns the
    references with their ``checkpoint_uri`` and the checkpoint's format and digest (its
    manifest's checksum), which a restore holds the manifest to (:func:`recover`).
    ``[ray] checkpoint_allow_pickle = False`` makes an output that only pickle can hold fail here.
    The task's checkpoint assets must lie above these checkpoints (checked before writing) and
    get an event describing them (:mod:`airflow_ray.assets`).
    """
    import ray

    from airflow_ray import assets, checkpoint
    from airflow_ray.checkpoint import path_component

    task = next(iter(references.values())).task
    base = checkpoint.resolve_checkpoint_location(
        checkpoint_path=settings.path,
        checkpoint_source=settings.source,
        dag_id=task.dag_id,
        run_id=task.run_id,
        task_id=task.task_id,
        map_index=task.map_index,
    )
    locations: dict[str, CheckpointLocation] = {  # keys are spelled like ids: one safe name each
        key: base
        if key == "return_value"
        else dataclasses.replace(base, uri=f"{base.uri}{path_component(key)}/")
        for key in references
    }
    assets.check_covered(settings.assets, task.task_id, [loc.uri for loc in locations.values()])
    # (the output's ObjectRef boxed: Ray hands it over unresolved, location, is a dataset's blocks)
    writes = [([refs[k]], locations[k], bool(ref.summary.get("dataset"))) for k, ref in references.items()]
    name = owner_name(task.dag_id, task.run_id)  # who holds the outputs writes them
    allow_pickle, claimant = config.checkpoint_allow_pickle(), deployment.current().id
    try:
        call = get_owner(name).write_checkpoints.remote(
            writes, allow_pickle=allow_pickle, deployment=claimant, node_id=node_id
        )
        boxes = ray.get(call)
    except (ValueError, ray.exceptions.RayActorError) as exc:  # as lookup() tells it
        forget_owners()
        raise RayObjectLostError(
            f"The outputs of {task.describe()} were lost before they were checkpointed: their "
            f"owner actor '{name}' is gone ({type(exc).__name__}). Run the task again."
        ) from exc
    manifests = ray.get([box[0] for box in boxes])
    for (key, ref), manifest in zip(references.items(), manifests, strict=True):
        log.info(
            "Checkpointed the output of %s to %s (%s bytes, %s)",
            ref.describe(),
            locations[key].uri,
            manifest["bytes"],
            manifest["checksum"],
        )
    if settings.assets:
        extras = {
            key: assets.event_extra(key, locations[key].uri, manifest)
            for key, manifest in zip(references, manifests, strict=True)
        }
        assets.record(settings.assets, settings.outlet_events, extras)
    return {
        key: dataclasses.replace(
            ref,
            checkpoint_uri=locations[key].uri,
            checkpoint_source=settings.source,
            checkpoint_format=manifest["format"],
            checkpoint_digest=manifest["checksum"],
        )
        for (key, ref), manifest in zip(references.items(), manifests, strict=True)
    }


def task_starting(ti: Any) -> None:
    """Called by :mod:`airflow_ray.listener` inside a task's context, before it runs."""
    global _plain_task
    _plain_task = (TaskKey(ti.dag_id, ti.run_id, ti.task_id, ti.map_index), *_checkpoint_settings())


# --- consuming -----------------------------------------------------------------------------------


def from_xcom(data: Any) -> Any:
    """What a consumer receives for a stored XCom value (``RayXComBackend.deserialize_value``).

    Returns :data:`NOT_OURS` for a value that is neither a reference nor a ``multiple_outputs``
    document (Airflow's own deserialization applies).
    """
    from airflow.sdk.bases.xcom import BaseXCom

    if ObjectReference.is_reference(data):
        return materialize([_verified(data)])[0]
    if _is_outputs(data):
        items = data[OUTPUTS]
        refs = {k: _verified(v) for k, v in items.items() if ObjectReference.is_reference(v)}
        values = dict(zip(refs, materialize(list(refs.values())), strict=True)) if refs else {}
        return {
            k: values[k] if k in values else BaseXCom.deserialize_value(_Stored(v)) for k, v in items.items()
        }
    return NOT_OURS


NOT_OURS = object()


def materialize(references: list[ObjectReference]) -> list[Any]:
    """Handles for a Ray consumer, values for everyone else."""
    if _consumer_is_ray_task():
        return [handle_for(r) for r in references]
    import ray

    from airflow_ray.hooks.ray import RayHook

    RayHook(references[0].ray_conn_id).connect()
    values = []
    for reference, ref in zip(references, resolve(references), strict=True):
        try:
            value = ray.get(ref)
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            # listed by its owner but lost (e.g. its node died): the checkpoint, or a clear error
            value = ray.get(recover(reference, type(exc).__name__))
        values.append(as_dataset(value) if reference.summary.get("dataset") else value)
    return values


def resolve(references: list[ObjectReference]) -> list[Any]:
    """ObjectRefs for the referenced objects, asked of each owner in one call.

    An object its owner no longer knows about, or an owner that is gone, is recovered
    (:func:`recover`).
    """
    return [
        recover(reference, found.why) if isinstance(found, NotHeld) else found
        for reference, found in zip(references, lookup(references), strict=True)
    ]


class NotHeld(NamedTuple):
    """An output its owner does not hold (any more), and why: what :func:`lookup` says instead of
    an ObjectRef."""

    why: str


def lookup(references: list[ObjectReference]) -> list[Any]:
    """The ObjectRef of each referenced object, or :class:`NotHeld`, asked of each owner in one
    call; nothing is restored (:func:`resolve` does that).

    The owners are looked up by the names in the (verified) references, never created.
    """
    import ray

    found: list[Any] = [None] * len(references)
    by_owner: dict[str, list[int]] = {}
    for i, reference in enumerate(references):
        by_owner.setdefault(reference.owner, []).append(i)
    for name, indexes in by_owner.items():
        group = [references[i] for i in indexes]
        try:
            owner = get_owner(name)
            boxed = ray.get(owner.lookup.remote([r.entry_key for r in group]))
        except (ValueError, ray.exceptions.RayActorError):
            forget_owners()
            for i in indexes:
                found[i] = NotHeld(f"its owner actor '{name}' is gone")
            continue
        for i, box in zip(indexes, boxed, strict=True):
            found[i] = (
                NotHeld("its owner no longer holds it (freed or owner restarted)") if box is None else box[0]
            )
    return found


def recover(reference: ObjectReference, why: str) -> Any:
    """The one decision on a lost output: restore it from its checkpoint, or a clear error.

    The checkpoint is read as the reference recorded it (format and digest): a manifest that was
    rewritten since is refused on the worker before its data is read, and pickle is unpickled only
    when the reference says pickle and ``[ray] checkpoint_allow_pickle`` allows it. The owner
    re-registers the restored object, so later readers get it from memory again. Returns the
    restored object's ObjectRef.
    """
    import ray

    from airflow_ray import checkpoint

    if not reference.checkpoint_uri:
        raise lost_error(reference, why)
    if reference.checkpoint_format == PICKLE and not config.checkpoint_allow_pickle():
        raise RayObjectLostError(
            f"The output of {reference.describe()} was lost ({why}) and its checkpoint "
            f"{reference.checkpoint_uri} is a pickle, which this deployment does not read "
            "([ray] checkpoint_allow_pickle = False; env AIRFLOW__RAY__CHECKPOINT_ALLOW_PICKLE). "
            f"Clear and re-run '{reference.task_id}' to recompute it, or allow pickle checkpoints."
        )
    options = checkpoint.storage_options_for(reference.checkpoint_uri, reference.checkpoint_source)
    read = functools.partial(
        checkpoint.read_checkpoint,
        expected_format=reference.checkpoint_format,
        expected_digest=reference.checkpoint_digest,
    )
    # The owner the restored object goes to is derived from the (verified) run, in this code
    # version: never an actor created from a name read from an XCom row.
    owner = get_owner(owner_name(reference.dag_id, reference.run_id), create=True)
    result = ray.get(
        owner.restore.remote(
            reference.entry_key,
            read,
            reference.checkpoint_uri,
            options,
            reference.summary,
        )
    )
    if not result["ok"]:
        error = result["error"]
        raise RayObjectLostError(
            f"The output of {reference.describe()} was lost ({why}) and restoring it from its "
            f"checkpoint {reference.checkpoint_uri} failed: {error['type']}: {error['message']}"
        )
    log.warning(
        "Restored the output of %s from its checkpoint %s", reference.describe(), reference.checkpoint_uri
    )
    return result["ref"][0]


def lost_error(reference: ObjectReference, why: str) -> RayObjectLostError:
    return RayObjectLostError(
        f"The output of {reference.describe()} is no longer in Ray's object store: {why}. "
        f"Clear and re-run '{reference.task_id}' to recompute it, or give it checkpoint=True so "
        "a lost output is restored from object storage."
    )


# --- releasing -----------------------------------------------------------------------------------


def references_in(data: Any) -> list[ObjectReference]:
    """The verified Ray references in a stored XCom value (one, or one per key of multiple_outputs).

    :raises UntrustedReferenceError: for a value that claims to be a reference but is not ours.
    """
    if ObjectReference.is_reference(data):
        return [_verified(data)]
    if _is_outputs(data):
        return [_verified(v) for v in data[OUTPUTS].values() if ObjectReference.is_reference(v)]
    return []


def release(references: list[ObjectReference]) -> int:
    """Ask the owners to drop the given entries (their objects are freed); returns how many they
    still held."""
    import ray

    from airflow_ray.hooks.ray import RayHook

    RayHook(references[0].ray_conn_id).connect()
    return sum(ray.get([get_owner(r.owner).release.remote(r.entry_key) for r in references], timeout=30))


# --- private helpers -----------------------------------------------------------------------------


def _reference(task: TaskKey, out: dict[str, Any], *, owner: str, ray_conn_id: str) -> ObjectReference:
    return ObjectReference(
        owner=owner,
        dag_id=task.dag_id,
        run_id=task.run_id,
        task_id=task.task_id,
        map_index=task.map_index,
        key=out["key"],
        object_id=out["object_id"],
        summary=out["summary"],
        ray_conn_id=ray_conn_id,
    )


def _stored(reference: ObjectReference) -> dict[str, Any]:
    """The JSON an XCom row holds for ``reference``: signed for this deployment (see :func:`_verified`)."""
    me = deployment.current()
    return reference.signed(me.id, me.key).to_json()


def _verified(data: dict[str, Any]) -> ObjectReference:
    """A stored reference, checked against this deployment's key before anything acts on it."""
    me = deployment.current()
    return ObjectReference.verified(data, me.id, me.key)


def _is_outputs(data: Any) -> bool:
    return isinstance(data, dict) and len(data) == 1 and isinstance(data.get(OUTPUTS), dict)


class _Stored:
    """The shape ``BaseXCom.deserialize_value`` expects: an object with ``.value``."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _pushed_outputs(task: TaskKey, key: str | None, value: Any) -> dict[str, Any] | None:
    """For a plain ``multiple_outputs`` task, the whole dict refers to the per-key XComs.

    Airflow pushes every key, then the whole dict as ``return_value``; storing that dict
    again would adopt every large value twice.
    """
    from airflow.sdk.bases.xcom import BaseXCom

    pushed = _recent_pushes.pop(task, None) if key == BaseXCom.XCOM_RETURN_KEY else None
    if not pushed or not isinstance(value, dict) or set(value) != set(pushed):
        return None
    if any(pushed[k][0] is not v for k, v in value.items()):
        return None
    stored = {k: pushed[k][1] for k in value}
    return {OUTPUTS: stored} if any(ObjectReference.is_reference(v) for v in stored.values()) else None


def _checkpoint_settings() -> tuple[CheckpointSettings | None, tuple[CheckpointAsset, ...]]:
    """The running plain task's checkpoint settings (None: no checkpoints) and checkpoint assets.

    ``@task`` has no ``checkpoint`` argument, so a plain task takes it from ``default_args``
    of its DAG or of a TaskGroup around it, the way ``@ray_task`` tasks get DAG-wide defaults.
    Needs the task's context (see :func:`task_starting`).
    """
    from airflow_ray import assets

    try:
        from airflow.sdk import get_current_context

        context = get_current_context()
    except Exception:
        return None, ()
    task = context["task"]
    if getattr(task, "_airflow_ray_consumer", False):
        return None, ()  # a Ray task checkpoints its own outputs
    declared = assets.declared(task.outlets)
    args = dict(getattr(context["dag"], "default_args", None) or {})
    groups = []
    group = getattr(task, "task_group", None)
    while group is not None:
        groups.append(group)
        group = getattr(group, "parent_group", None)
    for group in reversed(groups):  # the innermost group wins
        args.update(getattr(group, "default_args", None) or {})
    if not args.get("checkpoint"):
        return None, declared
    path = args.get("checkpoint_path")
    if path:
        path = task.render_template(path, context)
    settings = CheckpointSettings(path, args.get("checkpoint_source"), declared, context["outlet_events"])
    return settings, declared


def _plain_checkpoint(task: TaskKey) -> CheckpointSettings | None:
    """The checkpoint settings of the plain task pushing ``task``'s output, if it checkpoints.

    :raises ValueError: the task declares checkpoint assets but does not checkpoint.
    """
    from airflow_ray import assets

    if _plain_task is None or _plain_task[0] != task:
        return None
    _, settings, declared = _plain_task
    if declared and settings is None:
        raise assets.not_checkpointed_error(task.task_id, declared)
    return settings


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
