"""A server that accepts TCP connections and never answers: what an unresponsive service looks like.

A hung dashboard, a wedged MLflow server or an object store behind a black-holing proxy all
accept the connection (the kernel does that much) and then say nothing. Every network call
airflow-ray makes must give up on such a server after its configured timeout, naming the server,
the operation and the option to raise, instead of hanging the task (or the triggerer) forever.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class SilentServer:
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    """Listen on a free loopback port; accept every connection, read nothing, send nothing."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_forever() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener was closed: we are done
                return
            accepted.append(connection)  # held open, never answered

    thread = threading.Thread(target=accept_forever, name="silent-server", daemon=True)
    thread.start()
    try:
        yield SilentServer(*listener.getsockname()[:2])
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        listener.close()
        for connection in accepted:
            connection.close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def unresponsive_server() -> Iterator[SilentServer]:
    """One silent server for the session (connections to it cost nothing while they wait)."""
    with silent_server() as server:
        yield server
