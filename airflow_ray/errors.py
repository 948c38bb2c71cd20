"""Exceptions raised by airflow-ray.

Each one carries a message that names what failed (task, address, resource, object) and how
to recover, because these errors surface in an Airflow task log read by someone who did not
write the DAG.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException


class RayConnectionError(AirflowException):
    """The Ray cluster could not be reached (wrong address, cluster down, version mismatch)."""


class RayAuthenticationError(RayConnectionError):
    """The cluster rejected our token (Ray token authentication)."""


class InfeasibleResourcesError(AirflowException):
    """No node of the cluster can ever satisfy the task's resource request."""


class RaySerializationError(AirflowException):
    """An argument or return value of a Ray task cannot be pickled."""


class RayTaskError(AirflowException):
    """The function raised on the Ray worker; the message holds the remote traceback."""


class RayObjectLostError(AirflowException):
    """An upstream task's output is no longer in Ray's object store and cannot be restored."""
