"""The few fsspec operations checkpoints need, the same on local disks and object stores."""

from __future__ import annotations

import contextlib
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
