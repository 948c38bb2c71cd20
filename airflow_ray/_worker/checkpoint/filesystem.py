"""The few fsspec operations checkpoints need, the same on local disks and object stores."""

from __future__ import annotations

import contextlib
import datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

#: fsspec protocols of the local filesystem.
LOCAL_PROTOCOLS = frozenset({"file", "local"})


def open_fs(uri: str, storage_options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    """fsspec filesystem and bare directory path for a URI (fsspec caches the instances)."""
    import fsspec.core

    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path.rstrip("/")


def is_local(fs: AbstractFileSystem) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return any(p in LOCAL_PROTOCOLS for p in protocols)


def display(fs: AbstractFileSystem, path: str) -> str:
    """The path as a URI, for error messages."""
    return fs.unstrip_protocol(path)


def remove_quietly(fs: AbstractFileSystem, path: str) -> None:
    """Remove one file; a missing one is not an error."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def remove_tree(fs: AbstractFileSystem, path: str) -> None:
    """Remove a directory and everything below it; a missing one is not an error."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def subdirectories(fs: AbstractFileSystem, path: str) -> list[str]:
    """Paths of the directories directly under ``path`` (none if it does not exist)."""
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return [e["name"].rstrip("/") for e in entries if e["type"] == "directory"]


#: Where fsspec implementations put a path's modification time in ``info``/``find(detail=True)``:
#: local (``mtime``, epoch seconds), s3fs (``LastModified``), adlfs (``last_modified``), gcsfs
#: (``updated``, ISO 8601).
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "updated")


def modified_at(info: dict[str, Any]) -> datetime.datetime | None:
    """A path's modification time (UTC) from its fsspec ``info``; None when the store gives none
    (object stores have no time for a "directory" that is only a prefix)."""
    for key in _MODIFIED_KEYS:
        value = info.get(key)
        if isinstance(value, int | float):
            return datetime.datetime.fromtimestamp(value, datetime.UTC)
        if isinstance(value, str):
            value = datetime.datetime.fromisoformat(value)
        if isinstance(value, datetime.datetime):
            return value if value.tzinfo else value.replace(tzinfo=datetime.UTC)
    return None
