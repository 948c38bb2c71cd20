"""What checkpoint reads and writes raise; each error names the file or directory concerned."""

from __future__ import annotations

from typing import Any


class CheckpointError(Exception):
    """Base class of checkpoint errors; ``path`` names the file or directory concerned.

    Picklable with its ``path``, because these are raised on Ray workers and travel back.
    """

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.path))


class CheckpointCorruptError(CheckpointError, RuntimeError):
    """The checkpoint exists but its data is truncated, altered or cannot be parsed."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No complete checkpoint (no manifest) at the location: never written, or interrupted."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is not the one its reader expects: another format or another digest.

    The reference in XCom records what the write produced; a manifest that disagrees was rewritten
    after that write (by a later write outside Airflow, or by someone with write access to the
    store), and its data is not read.
    """
