"""Telling a request that got no answer in time from other failures, whatever library made it.

Every client library wraps the socket's timeout in its own exceptions (MLflow: ``MlflowException``
around ``requests`` around ``urllib3``; s3fs: botocore's ``ReadTimeoutError`` around aiohttp's),
but each keeps the original as the cause or context of what it raises, and at the bottom of the
chain is Python's own :class:`TimeoutError` (``socket.timeout`` and ``asyncio.TimeoutError`` are
aliases of it). Walking the chain recognises them all without importing any of them.
"""

from __future__ import annotations


def caused_by_timeout(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from or while handling, is a timeout.

    >>> try:
    ...     try:
    ...         raise TimeoutError("timed out")
    ...     except TimeoutError as inner:
    ...         raise RuntimeError("API request failed") from inner
    ... except RuntimeError as outer:
    ...     caused_by_timeout(outer)
    True
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TimeoutError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
