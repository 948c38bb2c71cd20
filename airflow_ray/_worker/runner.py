"""What runs on the Ray worker: the user's function, its captured output, its results.

This module is Ray-side: it imports only the standard library and Ray, and it is shipped to
the cluster by value (``cloudpickle.register_pickle_by_value``), so a remote cluster needs
Ray but not airflow-ray or Airflow installed.

:func:`execute` is a streaming generator. Each value it yields becomes a separate Ray object
owned by the caller, which is the detached owner actor, never the short-lived Airflow process.
That is how a ``multiple_outputs`` task gets one object per key without copying anything, and
how the last yield, a small metadata dict, reaches the owner without touching the data.
A Ray Data ``Dataset`` is yielded block by block, so the owner owns its blocks too: the
worker that executed the dataset may exit as soon as the task is done.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

from airflow_ray._worker import tracking

#: Marks where an upstream object goes in the (pickled) arguments: {SLOT: index, "path": [...]}.
SLOT = "__airflow_ray_slot__"
_FLUSH_INTERVAL_S = 0.3
_PLAIN_BUDGET = 2000


def execute(
    fn_blob: bytes, call_blob: bytes, spec: dict[str, Any], owner: Any, *inputs: Any
) -> Iterator[Any]:
    """Run the user's function on this worker and yield its outputs, then a metadata dict.

    :param fn_blob: the cloudpickled function (its real code, closures and module globals).
    :param call_blob: cloudpickled ``(args, kwargs)`` with :data:`SLOT` placeholders.
    :param spec: ``task_key`` (for log streaming), ``split`` (``None`` or ``"keys"``),
        ``datasets`` (indexes of inputs that are Ray Data datasets, given as lists of blocks).
    :param owner: handle of the owner actor, which buffers this task's log lines.
    :param inputs: upstream objects; Ray resolved them before calling us (zero-copy for
        numpy/Arrow buffers on the same node), so they arrive as values.
    """
    import ray.cloudpickle as cloudpickle

    task_key = spec["task_key"]
    with _CapturedOutput(owner, task_key):
        fn = cloudpickle.loads(fn_blob)
        args, kwargs = cloudpickle.loads(call_blob)
        values = [as_dataset(v) if i in spec.get("datasets", ()) else v for i, v in enumerate(inputs)]
        args = _fill(args, values)
        kwargs = _fill(kwargs, values)
        with _call_environment(args, kwargs):
            result = fn(*args, **kwargs)
    if spec.get("split") == "keys":
        if not isinstance(result, dict) or not all(isinstance(k, str) for k in result):
            raise TypeError(
                f"multiple_outputs=True needs the function to return a dict with str keys, "
                f"got {type(result).__name__}"
            )
        keys, values = list(result), list(result.values())
    else:
        keys, values = None, [result]
    parts, summaries = [], []
    for value in values:
        if is_dataset(value):
            value = value.materialize()  # run it once: summarize() and the blocks share the result
        summaries.append(summarize(value))
        count = 0
        for part in _parts(value):
            count += 1
            yield part
        parts.append(count)
    yield {"keys": keys, "summaries": summaries, "parts": parts}


def is_dataset(value: Any) -> bool:
    """A Ray Data ``Dataset`` (checked without importing ``ray.data``, which is slow to import)."""
    return type(value).__module__.startswith("ray.data") and hasattr(value, "to_arrow_refs")


def dataset_blocks(value: Any) -> Iterator[Any]:
    """The Arrow tables of a Dataset, executing it if it is not materialized yet.

    The blocks are owned by whoever ran the dataset (this worker, or an Airflow process), which
    may exit at any time; the caller re-creates them as objects owned by the owner actor.
    """
    import ray

    for ref in value.to_arrow_refs():
        yield ray.get(ref)


def as_dataset(block_refs: list[Any]) -> Any:
    """The Dataset made of the given Arrow blocks (ObjectRefs), without reading them."""
    import ray.data

    return ray.data.from_arrow_refs(list(block_refs))


def _parts(value: Any) -> Iterator[Any]:
    """What is yielded for one output: the value itself, or a Dataset's blocks one by one."""
    if is_dataset(value):
        yield from dataset_blocks(value)
    else:
        yield value


def summarize(value: Any) -> dict[str, Any]:
    """A small, JSON-safe description of a value for the XCom reference (type, shape, bytes)."""
    cls = type(value)
    summary: dict[str, Any] = {"type": f"{cls.__module__}.{cls.__qualname__}".removeprefix("builtins.")}
    with contextlib.suppress(Exception):
        if is_dataset(value):
            summary.update(dataset=True, rows=value.count(), bytes=int(value.size_bytes()))
        elif hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy and friends
            summary.update(shape=list(value.shape), dtype=str(value.dtype), bytes=int(value.nbytes))
        elif cls.__name__ == "DataFrame" and hasattr(value, "memory_usage"):  # pandas
            summary.update(
                rows=len(value),
                columns=len(value.columns),
                bytes=int(value.memory_usage(index=True, deep=False).sum()),
            )
        elif cls.__name__ == "Table" and hasattr(value, "num_rows"):  # pyarrow
            summary.update(rows=value.num_rows, columns=value.num_columns, bytes=int(value.nbytes))
        elif isinstance(value, (bytes, bytearray, memoryview, str, list, tuple, dict, set, frozenset)):
            summary.update(length=len(value))
        if is_plain(value):  # small JSON-like data: may live in the XCom table
            summary.update(plain=True, bytes=len(json.dumps(value, default=str)))
    return summary


def is_plain(value: Any) -> bool:
    """JSON-like data that Airflow's XCom table stores natively, checked in bounded time.

    Numbers, strings, dates and times, and lists/tuples/sets and str-keyed dicts of them, with
    at most a couple of thousand items in all: beyond that a value is not worth walking, and
    it goes to the object store whatever its size (see :func:`airflow_ray.outputs.stays_inline`).
    """
    return _is_plain(value, [_PLAIN_BUDGET])


def _is_plain(value: Any, budget: list[int]) -> bool:
    budget[0] -= 1
    if budget[0] < 0:
        return False
    if value is None or isinstance(value, (bool, int, float, datetime.date, datetime.timedelta)):
        return True
    if isinstance(value, str):
        budget[0] -= len(value) // 64
        return budget[0] >= 0
    if isinstance(value, (list, tuple, set, frozenset)):
        return all(_is_plain(v, budget) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v, budget) for k, v in value.items())
    return False


# --- private helpers -----------------------------------------------------------------------


@contextlib.contextmanager
def _call_environment(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[None]:
    """MLflow's URI and credentials of each ``TrackedRun`` argument, for this call only.

    This worker runs other DAGs' tasks next: whatever the function sets for MLflow (through
    ``TrackedRun.use``, ``mlflow.set_tracking_uri``) is put back as it was when it returns.
    A ``TrackedRun`` is known by its class's name, not by ``isinstance``: the class travels by
    value, and the copy in the arguments (pickled by the Airflow task process) is another class
    object than this module's (pickled by whichever process created the owner).
    """
    cls = tracking.TrackedRun
    with contextlib.ExitStack() as stack:
        for value in (*args, *kwargs.values()):
            if (type(value).__module__, type(value).__qualname__) == (cls.__module__, cls.__qualname__):
                stack.enter_context(value.environment())
        yield


def same_tuple(original: tuple[Any, ...], items: list[Any]) -> tuple[Any, ...]:
    """``items`` as a tuple of the original's type: a named tuple stays one (``ti`` is)."""
    return type(original)(*items) if hasattr(original, "_fields") else tuple(items)


def _fill(obj: Any, inputs: tuple[Any, ...] | list[Any]) -> Any:
    """Replace slot placeholders by the resolved upstream values, applying their index path."""
    if isinstance(obj, dict):
        if SLOT in obj and len(obj) == 2 and "path" in obj:
            value = inputs[obj[SLOT]]
            for step in obj["path"]:
                value = value[step]
            return value
        return {k: _fill(v, inputs) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, inputs) for v in obj]
    if isinstance(obj, tuple):
        return same_tuple(obj, [_fill(v, inputs) for v in obj])
    return obj


class _Tee(io.TextIOBase):
    """A text stream that writes to the original stream and to a shared buffer."""

    def __init__(self, original: Any, sink: list[str], lock: threading.Lock) -> None:
        self._original = original
        self._sink = sink
        self._lock = lock

    def write(self, s: str) -> int:
        with contextlib.suppress(Exception):
            self._original.write(s)
        with self._lock:
            self._sink.append(s)
        return len(s)

    def flush(self) -> None:
        with contextlib.suppress(Exception):
            self._original.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8")


class _CapturedOutput:
    """Streams print/logging output of the function to the owner while it runs.

    Ray forwards worker output only to the driver that submitted the task, and our tasks are
    submitted by the owner actor; so we ship the lines ourselves, batched every few hundred ms.
    """

    def __init__(self, owner: Any, task_key: Any) -> None:
        self._owner = owner
        self._task_key = task_key
        self._buffer: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pending: list[Any] = []

    def __enter__(self) -> _CapturedOutput:
        import ray

        node = ray.get_runtime_context().get_node_id()
        self._owner.task_started.remote(self._task_key, {"pid": os.getpid(), "node_id": node})
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(self._saved[0], self._buffer, self._lock)
        sys.stderr = _Tee(self._saved[1], self._buffer, self._lock)
        self._handler = logging.StreamHandler(sys.stderr)
        self._handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        self._saved_level = root.level
        root.addHandler(self._handler)
        if root.level > logging.INFO or root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
        self._thread = threading.Thread(target=self._pump, name="airflow-ray-log", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        self._stop.set()
        self._thread.join(timeout=5)
        root = logging.getLogger()
        root.removeHandler(self._handler)
        root.setLevel(self._saved_level)
        sys.stdout, sys.stderr = self._saved
        self._send()
        with contextlib.suppress(Exception):  # lines must arrive before the task completes
            ray.get(self._pending, timeout=10)

    def _pump(self) -> None:
        while not self._stop.wait(_FLUSH_INTERVAL_S):
            self._send()

    def _send(self) -> None:
        with self._lock:
            text = "".join(self._buffer)
            self._buffer.clear()
        if text:
            self._pending = [p for p in self._pending if not _done(p)]
            self._pending.append(self._owner.append_log.remote(self._task_key, text))


def _done(ref: Any) -> bool:
    import ray

    ready, _ = ray.wait([ref], timeout=0)
    return bool(ready)
