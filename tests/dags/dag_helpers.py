"""A helper module beside the DAGs, like a user's ``utils.py``: Ray workers cannot import it,
so airflow-ray must ship it by value with the functions that use it."""

from __future__ import annotations

OFFSET = 1000


def add_offset(values: list[int]) -> list[int]:
    return [v + OFFSET for v in values]
