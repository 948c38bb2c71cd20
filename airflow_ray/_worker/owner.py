"""The owner: detached actors that own task outputs so they outlive Airflow task processes.

A Ray object dies with the process that owns it, and an Airflow task process exits when the
task ends. So the process that creates an output must be long-lived: the owner actor either
**submits the task itself** (the caller owns a task's return values, and the data never
touches the Airflow process) or **adopts** a value (``ray.put`` inside the actor).

Owners are threaded actors (``max_concurrency``), so independent tasks run in parallel; a
DAG run's objects always live in one shard (picked by a stable hash of ``dag_id, run_id``),
so freeing a run is one call. Names carry the package version: ``get_if_exists=True`` would
otherwise hand an upgraded Airflow an old actor still running old code.

Keys: a task is a :class:`~airflow_ray._worker.keys.TaskKey`; an object entry is an
:class:`~airflow_ray._worker.keys.OutputKey` (the task plus the XCom key).
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from typing import Any

from airflow_ray._worker import runner
from airflow_ray._worker.checkpoint import CheckpointLocation, write_checkpoint
from airflow_ray._worker.keys import OutputKey, TaskKey

_MAX_LOG_CHARS = 8 * 1024 * 1024
_SWEEP_INTERVAL_S = 30.0
_FINISHED_TASK_RETENTION_S = 3600.0


class Owner:
    """Registry of the objects of many DAG runs, and the submitter of ``@ray_task`` functions."""

    def __init__(self, ttl_seconds: float, max_objects: int) -> None:
        import ray

        self._ttl = ttl_seconds
        self._max_objects = max_objects
        self._lock = threading.RLock()
        self._entries: dict[tuple[Any, ...], dict[str, Any]] = {}  # by OutputKey, as a tuple
        self._tasks: dict[TaskKey, dict[str, Any]] = {}
        # Made once: each ray.remote() of a function exports it to the cluster again, and this
        # actor's Ray job (hence what it exported) lives as long as the cluster's owners.
        self._execute = ray.remote(runner.execute)
        self._write: Any = ray.remote(write_checkpoint)
        self._read: Any = ray.remote(_read_checkpoint).options(num_returns=2, num_cpus=0)
        self._self = ray.get_runtime_context().current_actor
        threading.Thread(target=self._sweep_forever, name="airflow-ray-sweep", daemon=True).start()

    # -- running tasks ---------------------------------------------------------------------

    def run(
        self,
        task_key: TaskKey,
        fn_blob: bytes,
        call_blob: bytes,
        inputs: list[Any],
        options: dict[str, Any],
        spec: dict[str, Any],
    ) -> dict[str, Any]:
        """Submit the function, wait for it, and reply with what the Airflow task needs; never raises.

        ``spec`` is :func:`runner.execute`'s (``split``, ``datasets``), less the task key, plus
        ``inline_limit``: an output that is JSON-like and smaller than this many bytes comes back
        as its value and is not kept here (``None``: every output comes back as its value).
        Every other output is registered and comes back as ``object_id``, ``summary`` and its
        ObjectRef (boxed), so the caller needs no further round trip to use or release it.
        The reply also carries the whole captured log and the node the function ran on.

        ``inputs`` arrive boxed in a list so Ray hands us the ObjectRefs themselves, which we
        pass on as top-level arguments: Ray resolves those on the worker, not here.

        If the same task instance is still running here (its Airflow process died without
        cancelling it, and Airflow retried), this call attaches to that run and returns its
        result instead of running the function a second time.
        """
        with self._lock:
            current = self._tasks.get(task_key)
            if current is not None and not current["done"].is_set():
                attached = current
            else:
                attached = None
                state: dict[str, Any] = {
                    "started": None,
                    "log": [],
                    "log_chars": 0,
                    "gen": None,
                    "finished": None,
                    "done": threading.Event(),
                    "result": None,
                }
                self._tasks[task_key] = state
                self._drop(lambda key: key[:4] == tuple(task_key))  # a re-run replaces the old outputs
        if attached is not None:
            attached["done"].wait()
            return {**self._reply(task_key, attached), "attached": True}
        try:
            state["result"] = self._execute_and_register(
                task_key, state, fn_blob, call_blob, inputs, options, spec
            )
        finally:
            state["done"].set()
        return self._reply(task_key, state)

    def _reply(self, task_key: TaskKey, state: dict[str, Any]) -> dict[str, Any]:
        """A run's stored result plus its log and the ObjectRefs of its kept outputs.

        The refs are taken from the registry now, never stored with the result: the result is
        kept for an hour (for retries that attach), and a ref held there would keep a released
        output's memory alive.
        """
        result = {**state["result"], "log": state["log"]}
        if not result["ok"]:
            return result
        with self._lock:
            refs = {
                out["key"]: entry["ref"]
                for out in result["outputs"]
                if (entry := self._entries.get(tuple(task_key.output(out["key"]))))
                and entry["ref"].hex() == out.get("object_id")
            }
        kept = [out for out in result["outputs"] if "object_id" in out]
        if len(refs) < len(kept):
            message = f"the outputs of {task_key.describe()} were freed before this call could take them"
            error = {"kind": "OutputFreed", "type": "OutputFreed", "message": message, "details": message}
            return {**result, "ok": False, "error": error}
        result["outputs"] = [
            {**out, "ref": [refs[out["key"]]]} if out["key"] in refs else out for out in result["outputs"]
        ]
        return result

    def _execute_and_register(
        self,
        task_key: TaskKey,
        state: dict[str, Any],
        fn_blob: bytes,
        call_blob: bytes,
        inputs: list[Any],
        options: dict[str, Any],
        spec: dict[str, Any],
    ) -> dict[str, Any]:
        import ray

        spec = {**spec, "task_key": task_key}
        try:
            gen = self._execute.options(num_returns="streaming", **options).remote(
                fn_blob, call_blob, spec, self._self, *inputs
            )
            state["gen"] = gen
            refs = list(gen)
            meta = ray.get(refs[-1])
        except Exception as exc:
            return {"ok": False, "error": _describe(exc)}
        finally:
            state["finished"] = time.time()
        names = meta["keys"] or ["return_value"]
        limit = spec.get("inline_limit")
        outputs = []
        now, start = time.time(), 0
        for name, count, summary in zip(names, meta["parts"], meta["summaries"], strict=True):
            parts, start = refs[start : start + count], start + count
            ref = ray.put(parts) if summary.get("dataset") else parts[0]  # a dataset: its blocks
            if limit is None or (summary.get("plain") and summary["bytes"] < limit):
                outputs.append({"key": name, "summary": summary, "value": ray.get(ref)})
                continue
            object_id = self._register(task_key.output(name), ref, summary, now)
            outputs.append({"key": name, "object_id": object_id, "summary": summary})
        node_id = (state["started"] or {}).get("node_id")
        return {"ok": True, "outputs": outputs, "node_id": node_id}

    def task_started(self, task_key: TaskKey, info: dict[str, Any]) -> None:
        with self._lock:
            if (state := self._tasks.get(task_key)) is not None:
                state["started"] = {**info, "at": time.time()}

    def append_log(self, task_key: TaskKey, text: str) -> None:
        with self._lock:
            state = self._tasks.get(task_key)
            if state is None or state["log_chars"] > _MAX_LOG_CHARS:
                return
            state["log"].append(text)
            state["log_chars"] += len(text)

    def poll(self, task_key: TaskKey, log_offset: int) -> dict[str, Any]:
        """Whether the task started, and the log lines produced since ``log_offset``."""
        with self._lock:
            state = self._tasks.get(task_key)
            if state is None:
                return {"known": False, "started": None, "log": [], "offset": log_offset}
            log = state["log"][log_offset:]
            return {"known": True, "started": state["started"], "log": log, "offset": log_offset + len(log)}

    def cancel(self, task_key: TaskKey) -> bool:
        """Cancel a running task (force: the worker process is killed, C code included)."""
        import ray

        with self._lock:
            state = self._tasks.get(task_key)
        if state is None or state["gen"] is None or state["finished"]:
            return False
        ray.cancel(state["gen"], force=True)
        return True

    # -- the object registry ---------------------------------------------------------------

    def adopt(self, entry_key: OutputKey, value: Any, summary: dict[str, Any]) -> dict[str, Any]:
        """Take ownership of a value produced outside Ray (a plain ``@task`` output).

        Replies like :meth:`run` does for one kept output: ``object_id`` and the boxed ObjectRef.
        """
        import ray

        return self._adopted(entry_key, ray.put(value), summary)

    def adopt_blocks(self, entry_key: OutputKey, summary: dict[str, Any], *blocks: Any) -> dict[str, Any]:
        """Take ownership of a Ray Data dataset made outside Ray: copy its blocks into objects
        we own (the producer owns the originals and is about to exit)."""
        import ray

        return self._adopted(entry_key, ray.put([ray.put(block) for block in blocks]), summary)

    def _adopted(self, entry_key: OutputKey, ref: Any, summary: dict[str, Any]) -> dict[str, Any]:
        import ray

        object_id = self._register(entry_key, ref, summary)
        return {"object_id": object_id, "ref": [ref], "node_id": ray.get_runtime_context().get_node_id()}

    def _register(
        self, entry_key: OutputKey, ref: Any, summary: dict[str, Any], now: float | None = None
    ) -> str:
        created = time.time() if now is None else now
        with self._lock:
            self._entries[tuple(entry_key)] = {"ref": ref, "created": created, "summary": summary}
        return ref.hex()

    def lookup(self, entry_keys: list[OutputKey]) -> list[list[Any] | None]:
        """ObjectRefs for the given entries, each boxed in a list (``None`` if unknown)."""
        with self._lock:
            return [[e["ref"]] if (e := self._entries.get(tuple(k))) else None for k in entry_keys]

    def restore(
        self, entry_key: OutputKey, reader: Any, uri: str, options: dict[str, Any], summary: dict[str, Any]
    ) -> dict[str, Any]:
        """Load a checkpoint on a worker into an object we own, and register it.

        The read runs as our own task (so we own its result); a second, tiny return value tells
        us whether the read (and its checksum verification) succeeded without fetching the data.
        """
        import ray

        value_ref, ok_ref = self._read.remote(reader, uri, options)
        try:
            ray.get(ok_ref)
        except Exception as exc:
            return {"ok": False, "error": _describe(exc)}
        if summary.get("dataset"):  # a dataset's checkpoint is one table: one block
            value_ref = ray.put([value_ref])
        self._register(entry_key, value_ref, summary)
        return {"ok": True, "ref": [value_ref]}

    def write_checkpoints(
        self,
        writes: list[tuple[list[Any], CheckpointLocation, bool]],
        *,
        allow_pickle: bool,
        deployment: str,
        node_id: str | None,
    ) -> list[list[Any]]:
        """Submit the checkpoint writes of outputs we hold; the refs of their manifests, each boxed.

        ``writes`` are ``(boxed ObjectRef, location, blocks)``: the output's ref arrives boxed so
        Ray hands it over unresolved, and the other arguments are ``write_checkpoint``'s. The
        writes are our tasks, not the Airflow task process's: a task process is a Ray job of its
        own, whose first task waits for a new Ray worker process (measured: a small checkpoint
        took 0.6-0.8 s that way, 14-21 ms here), while the job of an owner the factory created keeps
        warm workers (:mod:`airflow_ray._worker.factory`). ``node_id`` (where the outputs were
        made) is preferred, so the data goes from the object store to storage without crossing
        nodes. The caller waits on the refs: a failed write raises there (a ``RayTaskError``
        naming the checkpoint error; its class is the copy shipped with this actor). The storage
        options pass through to the write tasks; nothing here keeps them.
        """
        near: dict[str, Any] = {}
        if node_id:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            near["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)
        write = self._write.options(num_cpus=0, **near)
        return [
            [write.remote(ref[0], location, blocks=blocks, allow_pickle=allow_pickle, deployment=deployment)]
            for ref, location, blocks in writes
        ]

    def release(self, prefix: tuple[Any, ...]) -> int:
        """Free every entry whose key starts with ``prefix`` (a run, a task, or one XCom)."""
        with self._lock:
            return self._drop(lambda key: key[: len(prefix)] == tuple(prefix))

    def entries(self) -> list[dict[str, Any]]:
        """What the registry holds (for ``airflow-ray gc`` and ``airflow-ray cluster status``)."""
        with self._lock:
            return [
                {"key": list(key), "created": e["created"], "object_id": e["ref"].hex(), **e["summary"]}
                for key, e in self._entries.items()
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pid": os.getpid(),
                "objects": len(self._entries),
                "bytes": sum(e["summary"].get("bytes", 0) for e in self._entries.values()),
                "runs": len({k[:2] for k in self._entries}),
                "tasks_in_flight": sum(1 for s in self._tasks.values() if not s["finished"]),
            }

    # -- retention -------------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> int:
        """Apply the TTL and the size bound; returns how many entries were freed."""
        now = time.time() if now is None else now
        with self._lock:
            freed = 0
            if self._ttl > 0:
                freed += self._drop(lambda key: now - self._entries[key]["created"] > self._ttl)
            if len(self._entries) > self._max_objects:
                runs: dict[tuple[str, str], float] = {}
                for key, entry in self._entries.items():
                    runs[key[:2]] = max(runs.get(key[:2], 0.0), entry["created"])
                for run in sorted(runs, key=runs.__getitem__):
                    if len(self._entries) <= self._max_objects:
                        break
                    freed += self._drop(lambda key, run=run: key[:2] == run)
            for task_key in [
                k
                for k, s in self._tasks.items()
                if s["finished"] and now - s["finished"] > _FINISHED_TASK_RETENTION_S
            ]:
                del self._tasks[task_key]
            return freed

    def _sweep_forever(self) -> None:
        while True:
            time.sleep(_SWEEP_INTERVAL_S)
            self.sweep()

    def _drop(self, predicate: Any) -> int:
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            del self._entries[key]  # dropping the last ObjectRef frees the object
        return len(doomed)


def _read_checkpoint(reader: Any, uri: str, options: dict[str, Any]) -> tuple[Any, bool]:
    return reader(uri, options), True


def shard_for(dag_id: str, run_id: str, shards: int) -> int:
    """Stable across processes (unlike ``hash``), so every task of a run finds the same shard."""
    return zlib.crc32(f"{dag_id}\0{run_id}".encode()) % shards


def _describe(exc: BaseException) -> dict[str, Any]:
    """A picklable description of a failure, with the remote traceback when there is one."""
    cause = getattr(exc, "cause", None)
    original = cause if isinstance(cause, BaseException) else exc
    return {
        "kind": type(exc).__name__,
        "type": f"{type(original).__module__}.{type(original).__qualname__}".removeprefix("builtins."),
        "message": str(original),
        "details": str(exc),
    }
