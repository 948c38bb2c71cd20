"""What checkpoint reads and writes raise; each error names the file or directory concerned."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ..timeouts import caused_by_timeout

F = TypeVar("F", bound=Callable[..., Any])


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


class CheckpointTimeoutError(CheckpointError, TimeoutError):
    """The object store accepted the connection but did not answer a request in time."""


def translate_timeouts(operation: str, location_parameter: str) -> Callable[[F], F]:
    """Decorate a checkpoint operation so that a store that stopped answering raises
    :class:`CheckpointTimeoutError` naming the operation, the location and the option to raise.

    The store's own error (botocore's names the endpoint URL) is kept in the message and as the
    cause: it is the one that says where the request went.

    :param location_parameter: the parameter holding the checkpoint's location or URI.
    """

    def decorate(func: F) -> F:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, CheckpointError) or not caused_by_timeout(exc):
                    raise
                location = signature.bind(*args, **kwargs).arguments[location_parameter]
                uri = str(getattr(location, "uri", location))
                raise CheckpointTimeoutError(
                    f"{operation} {uri} timed out: the object store did not answer ({exc}). If it is "
                    "only slow, raise [ray] storage_timeout_seconds (env "
                    "AIRFLOW__RAY__STORAGE_TIMEOUT_SECONDS) where Airflow runs the task, or set "
                    "config_kwargs connect_timeout / read_timeout in the storage connection's extra.",
                    uri,
                ) from exc

        return wrapper  # type: ignore[return-value]

    return decorate


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is not the one its reader expects: another format or another digest.

    The reference in XCom records what the write produced; a manifest that disagrees was rewritten
    after that write (by a later write outside Airflow, or by someone with write access to the
    store), and its data is not read.
    """


class CheckpointBaseError(CheckpointError):
    """The checkpoint base is not this deployment's (:mod:`.marker`): nothing is written or deleted."""
