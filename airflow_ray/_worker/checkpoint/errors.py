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


class CheckpointBaseError(CheckpointError):
    """The checkpoint base is not this deployment's (:mod:`.marker`): nothing is written or deleted."""
