"""The types that stand for a task output kept in Ray's object store (no Ray import needed).

Three small types cross the Airflow/Ray boundary; :mod:`airflow_ray.outputs` builds them:

* :class:`ObjectReference`: the JSON document stored in the XCom table instead of the data. It
  is readable in the UI (type, shape, rows, bytes) and never contains pickled bytes.
* :class:`ObjectHandle`: what a ``@ray_task`` consumer receives for an upstream output while
  Airflow renders its arguments. The handle, not the data, is sent to the Ray worker, where
  Ray resolves it zero-copy; the Airflow process never loads the data.
* :class:`RayResult`: what a ``@ray_task`` returns to Airflow when the Ray XCom backend is on:
  a description of objects already owned by the owner actor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from airflow_ray._worker.keys import OutputKey, TaskKey
from airflow_ray.exceptions import UntrustedReferenceError

#: Key of the JSON document's version: ``{"__airflow_ray__": 1, ...}`` marks a reference.
MARKER = "__airflow_ray__"
#: Version of the reference document (not the checkpoint manifest's, which has its own).
#: 2: signed and bound to a deployment (``deployment``, ``signature``).
REFERENCE_FORMAT_VERSION = 2


@dataclass(frozen=True)
class ObjectReference:
    """Where an XCom value lives in Ray. Serialised as a small JSON dict (well under 1 KB).

    A reference is input when it is read back: anyone who can write an XCom row (any task, the
    REST API) can write one. So it is signed (HMAC-SHA256 under the deployment's key over every
    field, see :meth:`signed`) by the process that produced the output, and :meth:`verified`
    before anything acts on it: the task instance, owner, object and checkpoint it names are
    those the producing task wrote, in this deployment.
    """

    owner: str
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    key: str
    object_id: str
    summary: dict[str, Any] = field(default_factory=dict)
    ray_conn_id: str = "ray_default"
    checkpoint_uri: str | None = None
    checkpoint_source: str | None = None
    #: The checkpoint as written (its manifest's ``format`` and ``checksum``): a restore refuses a
    #: manifest that says otherwise, and unpickles only when this says ``"pickle"``.
    checkpoint_format: str | None = None
    checkpoint_digest: str | None = None
    deployment: str = ""
    signature: str = ""

    @property
    def entry_key(self) -> OutputKey:
        """The owner's registry key of this output."""
        return OutputKey(self.dag_id, self.run_id, self.task_id, self.map_index, self.key)

    @property
    def task(self) -> TaskKey:
        return self.entry_key.task

    def describe(self) -> str:
        return self.entry_key.describe()

    def to_json(self) -> dict[str, Any]:
        return {MARKER: REFERENCE_FORMAT_VERSION, **asdict(self)}

    def signed(self, deployment: str, key: bytes) -> ObjectReference:
        """This reference bound to ``deployment`` and signed with its key."""
        unsigned = replace(self, deployment=deployment, signature="")
        return replace(unsigned, signature=unsigned._mac(key))

    @classmethod
    def verified(cls, data: dict[str, Any], deployment: str, key: bytes) -> ObjectReference:
        """Parse a stored reference and check it was signed by this deployment, unchanged.

        :raises UntrustedReferenceError: naming the mismatch (fields, deployment, or signature).
        """
        reference = cls._parse(data)
        where = f"The XCom value that refers to the output of {reference.describe()}"
        if reference.deployment != deployment:
            raise UntrustedReferenceError(
                f"{where} was written by Airflow deployment {reference.deployment!r}, and this is "
                f"{deployment!r}: deployments sharing a Ray cluster cannot read each other's outputs. "
                "Re-run the producing task in this deployment."
            )
        if not hmac.compare_digest(reference.signature, replace(reference, signature="")._mac(key)):
            raise UntrustedReferenceError(
                f"{where} does not carry a valid signature of this deployment: it was edited or "
                "forged after the task wrote it (e.g. returned by another task or written through "
                "the REST API). Refusing to touch Ray or storage for it; re-run the producing task."
            )
        return reference

    @staticmethod
    def is_reference(data: Any) -> bool:
        """Does ``data`` claim to be a reference (of any version)? Verify it before use."""
        return isinstance(data, dict) and MARKER in data and "object_id" in data

    @classmethod
    def _parse(cls, data: dict[str, Any]) -> ObjectReference:
        if data.get(MARKER) != REFERENCE_FORMAT_VERSION:
            raise UntrustedReferenceError(
                f"An XCom value is an airflow-ray reference of format {data.get(MARKER)!r}; this "
                f"version reads format {REFERENCE_FORMAT_VERSION}. Re-run the producing task."
            )
        known = {f.name: f for f in fields(cls)}
        values = {k: v for k, v in data.items() if k != MARKER}
        problems = [f"unknown field {k!r}" for k in values if k not in known]
        problems += [f"missing field {k!r}" for k in _REQUIRED if k not in values]
        for name, value in values.items():
            if name in known and not _has_type(value, _TYPES[name]):
                problems.append(f"field {name!r} is {type(value).__name__}")
        if problems:
            raise UntrustedReferenceError(
                f"An XCom value is not a valid airflow-ray reference: {'; '.join(problems)}."
            )
        return cls(**values)

    def _mac(self, key: bytes) -> str:
        document = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hmac.new(key, document.encode(), hashlib.sha256).hexdigest()


#: The JSON type(s) each field must have in a stored reference.
_TYPES: dict[str, tuple[type, ...]] = {
    "owner": (str,),
    "dag_id": (str,),
    "run_id": (str,),
    "task_id": (str,),
    "map_index": (int,),
    "key": (str,),
    "object_id": (str,),
    "summary": (dict,),
    "ray_conn_id": (str,),
    "checkpoint_uri": (str, type(None)),
    "checkpoint_source": (str, type(None)),
    "checkpoint_format": (str, type(None)),
    "checkpoint_digest": (str, type(None)),
    "deployment": (str,),
    "signature": (str,),
}
_REQUIRED = ("owner", "dag_id", "run_id", "task_id", "map_index", "key", "object_id", "deployment")


def _has_type(value: Any, types: tuple[type, ...]) -> bool:
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in types)


class ObjectHandle:
    """An upstream output handed to a Ray consumer unresolved, optionally indexed.

    Indexing (``handle[3]``, ``handle["train"]``) records a path that the Ray worker applies
    after resolving the object; that is how ``.expand()`` over a list stored in Ray gives each
    mapped task its element without loading the list in Airflow.
    """

    def __init__(self, reference: ObjectReference, path: tuple[Any, ...] = ()) -> None:
        self.reference = reference
        self.path = path

    def __getitem__(self, item: Any) -> ObjectHandle:
        return ObjectHandle(self.reference, (*self.path, item))

    def __repr__(self) -> str:
        path = "".join(f"[{p!r}]" for p in self.path)
        return f"<Ray object {self.reference.object_id[:12]}… {_short(self.reference.summary)}>{path}"


class SequenceHandle(ObjectHandle, Sequence):  # type: ignore[misc]  # items are handles too
    """An :class:`ObjectHandle` to a list/tuple: Airflow's mapping code checks ``Sequence``."""

    def __len__(self) -> int:
        return int(self.reference.summary.get("length", 0))

    def __iter__(self) -> Iterator[ObjectHandle]:
        return (self[i] for i in range(len(self)))


def handle_for(reference: ObjectReference) -> ObjectHandle:
    if reference.summary.get("type") in ("list", "tuple"):
        return SequenceHandle(reference)
    return ObjectHandle(reference)


@dataclass(frozen=True)
class RayResult:
    """A ``@ray_task`` output already in the object store, on its way to the XCom backend."""

    reference: ObjectReference

    def __repr__(self) -> str:
        return f"RayResult({_short(self.reference.summary)}, object {self.reference.object_id[:12]}…)"


class RaySequenceResult(RayResult, Sequence):
    """A list output: Airflow calls ``len()`` on it when mapped tasks depend on it."""

    def __len__(self) -> int:
        return int(self.reference.summary.get("length", 0))

    def __getitem__(self, index: Any) -> Any:
        raise TypeError("A Ray task's list output is resolved by its consumers, not in Airflow")


def result_for(reference: ObjectReference) -> RayResult:
    if reference.summary.get("type") in ("list", "tuple"):
        return RaySequenceResult(reference)
    return RayResult(reference)


def _short(summary: dict[str, Any]) -> str:
    parts = [summary.get("type", "?")]
    if "shape" in summary:
        parts.append("x".join(map(str, summary["shape"])))
    if "rows" in summary:
        parts.append(f"{summary['rows']} rows")
    if "length" in summary:
        parts.append(f"len {summary['length']}")
    if "bytes" in summary:
        parts.append(_human_bytes(summary["bytes"]))
    return " ".join(parts)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
