"""Version skew between this process and a Ray cluster, caught when connecting, in one message.

A driver (``host:6379``, ``auto``) needs the cluster's Ray version and Python version (to the
patch, by Ray's default); a Ray Client (``ray://``) needs the same Ray version and Python minor.
Ray checks this too, but late and in its own words: a driver after ``ray.init`` has joined, a Ray
Client after the server has started a session for it, and neither error says which Ray
installation this is nor which connection named the cluster. So:

* for a GCS address, :func:`airflow_ray.hooks.ray.probe` reads the versions the head recorded
  (the cluster metadata, with the same gRPC call that checks the address and the token) and
  :func:`check` refuses a mismatch before ``ray.init``;
* for a Ray Client address the server tells its versions only inside a session: ``RayHook``
  connects with Ray's own check deferred and runs :func:`check` on what the session reports.

.. code-block:: python

    from airflow_ray import versions

    versions.check({"ray_version": "2.52.1", "python_version": "3.12.3"}, label="ray://head:10001 "
                   "(from Airflow connection 'ray_default')", client=True)
    # RayVersionMismatchError: Ray version mismatch: this Airflow host has Ray 2.60.0
    # (/venv/lib/python3.11/site-packages/ray) on Python 3.11.7 (/venv/bin/python), the cluster at
    # ray://head:10001 (from Airflow connection 'ray_default') runs Ray 2.52.1 on Python 3.12.3 ...
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from airflow_ray import compat
from airflow_ray.exceptions import RayVersionMismatchError

#: Ray's escape hatch for Ray Client version checks, honoured here as Ray honours it.
IGNORE_VARIABLE = "RAY_IGNORE_VERSION_MISMATCH"


def check(cluster: dict[str, Any], *, label: str, client: bool, reported_by: str = "") -> None:
    """Raise unless this process may connect to a cluster that reports ``cluster``'s versions.

    :param cluster: ``ray_version`` and ``python_version`` as the cluster reported them.
    :param label: the cluster's address and where it came from (``RayTarget.describe()``).
    :param client: a Ray Client connection (Python minor must match) rather than a driver.
    :param reported_by: who reported the cluster's versions, for the message.
    :raises RayVersionMismatchError: naming both sides' versions, where each was found, the fix.
    """
    if client and IGNORE_VARIABLE in os.environ:
        return
    if compat.versions_match(cluster, client=client):
        return
    raise RayVersionMismatchError(
        mismatch_message(cluster, label=label, client=client, reported_by=reported_by)
    )


def local() -> str:
    """This process's Ray and Python, and where each is installed."""
    import ray

    return (
        f"Ray {ray.__version__} ({os.path.dirname(ray.__file__)}) "
        f"on Python {platform.python_version()} ({sys.executable})"
    )


def mismatch_message(cluster: dict[str, Any], *, label: str, client: bool, reported_by: str = "") -> str:
    """The one error text for a version skew: both sides, where each came from, the fix."""
    import ray

    ours_python = platform.python_version()
    theirs_ray, theirs_python = cluster.get("ray_version", "?"), cluster.get("python_version", "?")
    by = f" ({reported_by})" if reported_by else ""
    if client:
        rule = "Ray Client needs the same Ray version and the same Python minor version on both sides"
    else:
        rule = "a Ray driver needs the cluster's Ray version and Python version"
    fixes = []
    if theirs_ray != ray.__version__:
        fixes.append(f"install ray=={theirs_ray} on this host (or run Ray {ray.__version__} on the cluster)")
    if theirs_python != ours_python:
        fixes.append(f"run this host's Airflow on Python {theirs_python} (or the cluster on {ours_python})")
    return (
        f"Ray version mismatch: this Airflow host has {local()}, the cluster at {label} runs "
        f"Ray {theirs_ray} on Python {theirs_python}{by}. {rule[0].upper()}{rule[1:]}: "
        f"{' and '.join(fixes)}."
    )
