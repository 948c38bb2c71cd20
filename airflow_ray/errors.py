"""Deprecated: the exceptions moved to :mod:`airflow_ray.exceptions` (Airflow providers' name)."""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    from airflow_ray import exceptions

    value = getattr(exceptions, name)  # RayTaskError warns once more, with its own message
    warnings.warn(
        f"airflow_ray.errors is deprecated: import {name} from airflow_ray.exceptions",
        DeprecationWarning,
        stacklevel=2,
    )
    return value
