"""Environment variables set for one call and restored exactly afterwards (including absence).

Some libraries read secrets from the environment only (MLflow's credentials), and the processes
that run our calls live on: a Ray worker runs task after task, of any DAG, and an Airflow task
process under ``dag.test()`` runs every task of a run. A variable left behind by one call is a
secret handed to the next, so whoever sets one uses :func:`scoped_environ`:

.. code-block:: python

    import os

    from airflow_ray._worker.environment import scoped_environ

    with scoped_environ({"MLFLOW_TRACKING_TOKEN": "t0ken"}):
        assert os.environ["MLFLOW_TRACKING_TOKEN"] == "t0ken"
    assert "MLFLOW_TRACKING_TOKEN" not in os.environ  # or its value from before, if it had one

Threads: the environment is one per process, so scopes that overlap in time (a threaded actor,
an async Serve replica handling calls at once) cannot keep their values apart; during the
overlap every thread sees the most recent scope's value. What stays exact is the end: whatever
order overlapping scopes finish in, the variable is back to its value from before the first of
them (a plain save/restore would put back the other scope's secret when scopes end out of order).
Calls that need *different* credentials at the same time must run in different processes, which
is what Ray tasks do (one at a time per worker process). We do not serialize the scopes instead:
that would serialize whole user functions behind one lock.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import types
from collections.abc import Iterator, Mapping

#: Where the process keeps its open scopes (see :func:`_open_scopes`).
_STATE_MODULE = "airflow_ray._worker.environment.state"


@contextlib.contextmanager
def scoped_environ(variables: Mapping[str, str]) -> Iterator[None]:
    """Set ``variables`` in ``os.environ`` for the block; restore the previous values after it."""
    token = object()
    lock, open_scopes = _open_scopes()
    with lock:
        for name, value in variables.items():
            open_scopes.setdefault(name, (os.environ.get(name), []))[1].append((token, value))
            os.environ[name] = value
    try:
        yield
    finally:
        with lock:
            for name in variables:
                before, scopes = open_scopes[name]
                scopes[:] = [scope for scope in scopes if scope[0] is not token]
                if scopes:
                    os.environ[name] = scopes[-1][1]
                    continue
                del open_scopes[name]
                if before is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = before


def _open_scopes() -> tuple[threading.Lock, dict[str, tuple[str | None, list[tuple[object, str]]]]]:
    """The process's lock and, per variable set by a scope still open, its value before the first
    such scope and the open scopes' values (oldest first, with each scope's token).

    Kept in ``sys.modules``, not in this module's globals: this module travels by value, and
    every pickle of it (the runner's, a ``TrackedRun``'s) would bring its own copy.
    """
    state = sys.modules.get(_STATE_MODULE)
    if state is None:
        fresh = types.ModuleType(_STATE_MODULE)
        fresh.lock = threading.Lock()  # type: ignore[attr-defined]
        fresh.open_scopes = {}  # type: ignore[attr-defined]
        state = sys.modules.setdefault(_STATE_MODULE, fresh)  # atomic: one winner per process
    return state.lock, state.open_scopes
