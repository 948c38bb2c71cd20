"""``scoped_environ``: variables set for a block and restored exactly, also when scopes overlap."""

from __future__ import annotations

import os
import threading

from airflow_ray._worker.environment import scoped_environ


def test_restores_previous_values_and_absence(monkeypatch):
    monkeypatch.setenv("SCOPED_KEPT", "before")
    monkeypatch.delenv("SCOPED_ABSENT", raising=False)
    with scoped_environ({"SCOPED_KEPT": "during", "SCOPED_ABSENT": "during"}):
        assert (os.environ["SCOPED_KEPT"], os.environ["SCOPED_ABSENT"]) == ("during", "during")
    assert os.environ["SCOPED_KEPT"] == "before"
    assert "SCOPED_ABSENT" not in os.environ


def test_restores_after_an_exception(monkeypatch):
    monkeypatch.delenv("SCOPED_ABSENT", raising=False)
    try:
        with scoped_environ({"SCOPED_ABSENT": "during"}):
            raise RuntimeError("the call failed")
    except RuntimeError:
        pass
    assert "SCOPED_ABSENT" not in os.environ


def test_overlapping_scopes_ending_out_of_order_leave_nothing_behind(monkeypatch):
    """Thread 1 opens, thread 2 opens, thread 1 ends, thread 2 ends: a plain save/restore would
    leave thread 1's secret behind (thread 2 saved it as "before")."""
    monkeypatch.delenv("SCOPED_SECRET", raising=False)
    first_open, second_open, first_done = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, str | None] = {}

    def first() -> None:
        with scoped_environ({"SCOPED_SECRET": "first"}):
            first_open.set()
            second_open.wait(10)
        seen["after first"] = os.environ.get("SCOPED_SECRET")
        first_done.set()

    def second() -> None:
        first_open.wait(10)
        with scoped_environ({"SCOPED_SECRET": "second"}):
            second_open.set()
            first_done.wait(10)
            seen["second, after first"] = os.environ.get("SCOPED_SECRET")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"after first": "second", "second, after first": "second"}
    assert "SCOPED_SECRET" not in os.environ
