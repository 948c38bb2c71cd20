"""Exceptions raised by airflow-ray.

Each one carries a message that names what failed (task, address, resource, object) and how
to recover, because these errors surface in an Airflow task log read by someone who did not
write the DAG.
"""

from __future__ import annotations

from airflow.sdk.exceptions import AirflowException

from airflow_ray._api import deprecated_aliases, public_api


@public_api("stable")
class RayConnectionError(AirflowException):
    """The Ray cluster could not be reached (wrong address, cluster down, version mismatch)."""


@public_api("stable")
class RayAuthenticationError(RayConnectionError):
    """The cluster rejected our token (Ray token authentication)."""


@public_api("beta")
class RayVersionMismatchError(RayConnectionError):
    """This process and the cluster run different Ray versions (or Python versions, as Ray's own
    check counts them); the message names both and where each was found."""


@public_api("beta")
class ServiceTimeoutError(AirflowException, TimeoutError):
    """A server accepted the connection but did not answer in time (Ray Jobs API, MLflow, Serve).

    Build it with :func:`service_timeout`, so every such message names the server, the operation
    and the ``[ray]`` option that bounds it.
    """


def service_timeout(server: str, operation: str, seconds: float, option: str) -> ServiceTimeoutError:
    """The error for ``operation`` on ``server`` that got no answer within ``seconds``.

    :param server: what and where, e.g. ``"the Ray Jobs API at http://head:8265"``.
    :param option: the ``[ray]`` option whose value ``seconds`` is.
    """
    return ServiceTimeoutError(
        f"{server} did not answer {operation} within {seconds:g} s. If it is only slow, raise "
        f"[ray] {option} (env AIRFLOW__RAY__{option.upper()}); otherwise check that it is up and "
        "that nothing between us (proxy, firewall) swallows the request."
    )


@public_api("stable")
class InfeasibleResourcesError(AirflowException):
    """No node of the cluster can ever satisfy the task's resource request."""


@public_api("stable")
class RaySerializationError(AirflowException):
    """An argument or return value of a Ray task cannot be pickled."""


@public_api("stable")
class RayTaskFailedError(AirflowException):
    """The function raised on the Ray worker (or was cancelled); the message holds the remote traceback.

    Named apart from Ray's own ``ray.exceptions.RayTaskError``, which this error translates.
    """


@public_api("stable")
class RayObjectLostError(AirflowException):
    """An upstream task's output is no longer in Ray's object store and cannot be restored."""


@public_api("stable")
class UntrustedReferenceError(AirflowException):
    """An XCom value claims to be an airflow-ray reference but was not written, unchanged, by a
    task of this deployment (edited, forged, malformed, or from another deployment)."""


__getattr__ = deprecated_aliases(
    __name__, {"RayTaskError": ("RayTaskFailedError", " (the old name shadowed Ray's own RayTaskError)")}
)
