"""Submitting a function to Ray from an Airflow task process, and waiting for it.

The Airflow process never runs the function and never holds its kept outputs: it pickles the
function (its real code, closures and DAG-folder helper modules), swaps upstream
:class:`~airflow_ray.references.ObjectHandle` arguments for ObjectRefs, and asks the owner
actor to submit :func:`airflow_ray._worker.runner.execute`. While the task runs it streams the
function's output into the Airflow log, watches for resource requests no node can satisfy, and
cancels the Ray task if Airflow gives up on it (``execution_timeout``, kill, ``KeyboardInterrupt``).
What the owner replies (kept outputs as ObjectRefs, small ones as values) goes to
:func:`airflow_ray.outputs.publish`.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from airflow_ray import outputs
from airflow_ray._worker.keys import TaskKey
from airflow_ray._worker.runner import SLOT, same_tuple
from airflow_ray.exceptions import (
    InfeasibleResourcesError,
    RaySerializationError,
    RayTaskFailedError,
)
from airflow_ray.owners import get_owner, owner_name
from airflow_ray.references import ObjectHandle, ObjectReference

_POLL_INTERVAL_S = 0.2
_FEASIBILITY_INTERVAL_S = 2.0
_CANCEL_GRACE_S = 10.0
_LOST_KINDS = (
    "ObjectLostError",
    "OwnerDiedError",
    "ObjectReconstructionFailedError",
    "ObjectReconstructionFailedMaxAttemptsExceededError",
    "ObjectReconstructionFailedLineageEvictedError",
    "ReferenceCountingAssertionError",
)
_SERIALIZATION_HINTS = ("Could not serialize", "cannot pickle", "Can't pickle")


class TaskLog(Protocol):
    """Where the function's output and our warnings go: a task's ``self.log`` or a stdlib logger."""

    def info(self, msg: Any, /, *args: Any) -> Any: ...
    def warning(self, msg: Any, /, *args: Any) -> Any: ...
    def exception(self, msg: Any, /, *args: Any) -> Any: ...


@dataclass
class TaskRequest:
    """Everything needed to run one task instance's function on Ray."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    task_key: TaskKey
    options: dict[str, Any] = field(default_factory=dict)
    split: str | None = None
    infeasible_timeout: float = 60.0
    #: Outputs JSON-like and smaller than this come back as values; ``None``: every output does.
    #: The default keeps every output in Ray (see :func:`airflow_ray.outputs.inline_limit`).
    inline_limit: int | None = 0

    def __post_init__(self) -> None:
        self.task_key = TaskKey(*self.task_key)  # a plain tuple is accepted too

    @property
    def label(self) -> str:
        return self.task_key.describe()


def run(request: TaskRequest, log: TaskLog) -> dict[str, Any]:
    """Run the function on Ray and return the owner's reply: ``outputs`` and ``node_id``.

    Raises an Airflow exception with a clear message for every failure; on any exception
    while waiting (timeout, kill) the Ray task is cancelled before the exception propagates.
    An input that its owner still lists but the cluster lost (its node died) is restored from
    its checkpoint and the function runs once more.
    """
    import ray

    fn_blob = pickle_function(request.fn, request.label)
    template, handles = extract_handles((request.args, request.kwargs))
    references = [h.reference for h in handles]
    inputs = outputs.resolve(references)
    call_blob = _dumps(template, f"the arguments of {request.label}")
    owner = get_owner(owner_name(request.task_key.dag_id, request.task_key.run_id), create=True)
    spec = {
        "split": request.split,
        "datasets": [i for i, r in enumerate(references) if r.summary.get("dataset")],
        "inline_limit": request.inline_limit,
    }
    for attempt in (1, 2):
        run_ref = owner.run.remote(request.task_key, fn_blob, call_blob, inputs, request.options, spec)
        try:
            log_offset = _wait(run_ref, owner, request, log)
        except BaseException:
            _cancel(run_ref, owner, request, log)
            raise
        reply = ray.get(run_ref)
        _log_lines(reply["log"][log_offset:], log)
        if reply.get("attached"):
            log.warning(
                "%s was still running on Ray from an earlier try: used its result instead of running "
                "the function again",
                request.label,
            )
        if reply["ok"]:
            return reply
        lost = _lost_inputs(reply["error"], references)
        if attempt == 2 or not lost:
            break
        # Listed by the owner but gone from the cluster (its node died): restore, run again.
        for i in lost:
            inputs[i] = outputs.recover(references[i], reply["error"]["kind"])
    raise _translate(reply["error"], request, references)


def cancel(task_key: TaskKey, log: TaskLog) -> None:
    """Airflow is killing the task: cancel its Ray task too (no orphaned work)."""
    import ray

    try:
        ray.get(
            get_owner(owner_name(task_key.dag_id, task_key.run_id)).cancel.remote(task_key),
            timeout=_CANCEL_GRACE_S,
        )
        log.warning("Cancelled the Ray task of %s", task_key.describe())
    except Exception:
        log.exception("Could not cancel the Ray task of %s", task_key.describe())


def pickle_function(fn: Callable[..., Any], label: str) -> bytes:
    """Cloudpickle the function by value where needed.

    Airflow imports DAG files under generated module names, and helper modules beside them
    are importable only from the DAGs folder; Ray workers have neither. Those modules are
    pickled by value (code and globals), everything installed is pickled by reference.
    """
    for module in _local_modules(fn):
        import ray.cloudpickle as cloudpickle

        cloudpickle.register_pickle_by_value(module)
    return _dumps(fn, f"the function of {label}")


def extract_handles(obj: Any) -> tuple[Any, list[ObjectHandle]]:
    """Replace every :class:`ObjectHandle` (at any depth) by a slot the worker fills in."""
    handles: list[ObjectHandle] = []

    def walk(value: Any) -> Any:
        if isinstance(value, ObjectHandle):
            handles.append(value)
            return {SLOT: len(handles) - 1, "path": list(value.path)}
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list) or type(value).__name__ == "LazyXComSequence":
            return [walk(v) for v in value]  # a mapped upstream's outputs, one handle each
        if isinstance(value, tuple):
            return same_tuple(value, [walk(v) for v in value])
        return value

    return walk(obj), handles


def required_resources(options: dict[str, Any]) -> dict[str, float]:
    """The resource request Ray will schedule on, in the names ``ray.nodes()`` reports."""
    wanted: dict[str, float] = {"CPU": float(options.get("num_cpus", 1) or 0)}
    if options.get("num_gpus"):
        wanted["GPU"] = float(options["num_gpus"])
    if options.get("memory"):
        wanted["memory"] = float(options["memory"])
    for name, amount in (options.get("resources") or {}).items():
        wanted[name] = float(amount)
    if options.get("accelerator_type"):
        wanted[f"accelerator_type:{options['accelerator_type']}"] = 0.001
    return {k: v for k, v in wanted.items() if v > 0}


def missing_resources(wanted: dict[str, float], nodes: list[dict[str, Any]]) -> str | None:
    """None if some alive node can satisfy ``wanted``; else what the closest node lacks."""
    best: list[str] | None = None
    for node in nodes:
        if not node.get("Alive", True):
            continue
        have = node.get("Resources", {})
        lacking = [
            f"{name}={amount:g} (node has {have.get(name, 0):g})"
            for name, amount in wanted.items()
            if have.get(name, 0) + 1e-9 < amount
        ]
        if not lacking:
            return None
        if best is None or len(lacking) < len(best):
            best = lacking
    return ", ".join(best or [f"{k}={v:g}" for k, v in wanted.items()])


# --- private helpers -----------------------------------------------------------------------


def _wait(run_ref: Any, owner: Any, request: TaskRequest, log: TaskLog) -> int:
    """Wait for the owner's reply, streaming the log meanwhile; returns the log chunks shown.

    A task that ends within the first poll interval costs no poll at all: its log arrives
    with the reply.
    """
    import ray

    offset = 0
    wanted = required_resources(request.options)
    infeasible_since: float | None = None
    next_check = 0.0
    while True:
        ready, _ = ray.wait([run_ref], timeout=_POLL_INTERVAL_S)
        if ready:
            return offset
        state = ray.get(owner.poll.remote(request.task_key, offset))
        offset = state["offset"]
        _log_lines(state["log"], log)
        now = time.monotonic()
        if state["started"] or now < next_check:
            continue
        next_check = now + _FEASIBILITY_INTERVAL_S
        lacking = missing_resources(wanted, ray.nodes())
        if lacking is None:
            infeasible_since = None
            continue
        infeasible_since = infeasible_since or now
        if now - infeasible_since >= request.infeasible_timeout:
            raise InfeasibleResourcesError(
                f"{request.label} asks for resources no node of the Ray cluster has: {lacking}. "
                f"Waited {request.infeasible_timeout:g}s (raise [ray] infeasible_task_timeout for "
                "an autoscaling cluster that adds such nodes on demand)."
            )
        log.warning("Waiting for resources no node has yet: %s", lacking)


def _log_lines(chunks: list[str], log: TaskLog) -> None:
    for chunk in chunks:
        for line in chunk.rstrip("\n").split("\n"):
            log.info("[ray] %s", line)


def _cancel(run_ref: Any, owner: Any, request: TaskRequest, log: TaskLog) -> None:
    """Best effort: cancel the Ray task and wait briefly for the cancellation to land."""
    import ray

    try:
        cancelled = ray.get(owner.cancel.remote(request.task_key), timeout=_CANCEL_GRACE_S)
        ray.wait([run_ref], timeout=_CANCEL_GRACE_S)
        log.warning(
            "Cancelled the Ray task of %s" if cancelled else "No Ray task to cancel for %s", request.label
        )
    except Exception:  # the cluster may be the reason we are failing
        log.exception("Could not cancel the Ray task of %s", request.label)


def _translate(error: dict[str, Any], request: TaskRequest, references: list[ObjectReference]) -> Exception:
    kind, details = error["kind"], error["details"]
    if (lost := _lost_inputs(error, references)) is not None:
        return outputs.lost_error(references[lost[0]], details.splitlines()[0] if details else kind)
    if kind in ("TaskCancelledError",):
        return RayTaskFailedError(f"The Ray task of {request.label} was cancelled.")
    if any(hint in details for hint in _SERIALIZATION_HINTS):
        return RaySerializationError(
            f"The return value of {request.label} cannot be serialized by Ray: {error['message']}"
        )
    return RayTaskFailedError(
        f"{request.label} failed on Ray with {error['type']}: {error['message']}\n"
        f"Remote traceback:\n{details}"
    )


def _lost_inputs(error: dict[str, Any], references: list[ObjectReference]) -> list[int] | None:
    """Which inputs a failure says are lost: those named in it, else all; None if not a loss."""
    # The loss arrives as itself or wrapped in a Ray RayTaskError whose cause is the loss.
    kinds = {error["kind"], error["type"].rsplit(".", 1)[-1]}
    if not kinds & set(_LOST_KINDS) or not references:
        return None
    named = [i for i, r in enumerate(references) if r.object_id in error["details"]]
    return named or list(range(len(references)))


def _dumps(obj: Any, what: str) -> bytes:
    import ray.cloudpickle as cloudpickle

    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:
        raise RaySerializationError(
            f"Cannot send {what} to Ray: {type(exc).__name__}: {exc}. Values crossing to Ray "
            "must be picklable; create clients, connections, locks and open files inside the function."
        ) from exc


def _local_modules(fn: Callable[..., Any]) -> list[ModuleType]:
    """Modules of the DAGs folder that ``fn`` needs (its own, and helpers it references)."""
    roots = _dags_folders()
    seen: set[str] = set()
    found: list[ModuleType] = []

    def visit(name: str | None) -> None:
        if not name or name in seen:
            return
        seen.add(name)
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if module is None or file is None or name == "__main__":
            return
        local = name.startswith("unusual_prefix_") or any(
            Path(file).resolve().is_relative_to(root) for root in roots
        )
        if not local:
            return
        found.append(module)
        for value in vars(module).values():
            if inspect.ismodule(value):
                visit(value.__name__)
            elif inspect.isfunction(value) or inspect.isclass(value):
                visit(getattr(value, "__module__", None))

    visit(getattr(fn, "__module__", None))
    for value in getattr(fn, "__globals__", {}).values():
        if inspect.ismodule(value):
            visit(value.__name__)
    return found


def _dags_folders() -> list[Path]:
    try:
        from airflow.sdk.configuration import conf

        folder = conf.get("core", "dags_folder", fallback=None)
    except Exception:
        folder = None
    return [Path(folder).expanduser().resolve()] if folder else []
