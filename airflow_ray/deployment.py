"""Which Airflow deployment this process belongs to, on a Ray cluster that several may share.

Staging and production, or two teams, often point at one Ray cluster, and their DAG ids and run
ids collide (``etl``/``scheduled__2026-01-01…`` exist in both). Everything airflow-ray names on
the cluster therefore carries the deployment: owner actors (:mod:`airflow_ray.owners`), and with
them every registry entry and the scope of ``airflow-ray gc``, and the ids of the Ray Jobs it
submits (:mod:`airflow_ray.operators.job`); and every reference it writes to
the XCom table is signed with the deployment's key (:mod:`airflow_ray.references`), so a row
that was edited, forged, or written by another deployment is refused before anything acts on it.

Both come from one secret that lives where Airflow keeps secrets, in the metadata DB:

* the Airflow Variable ``airflow_ray_deployment_secret`` (masked in the UI and logs because of
  its name; a secrets backend or ``AIRFLOW_VAR_AIRFLOW_RAY_DEPLOYMENT_SECRET`` may provide it
  instead). It is created on first use, or ahead of time with ``airflow-ray deployment``;
* the deployment id is ``[ray] deployment_id`` when set, else derived from the secret (a hash:
  stable for as long as the metadata DB is, and saying nothing about the secret).

Airflow 3 task processes cannot read the metadata DB: they read the Variable through the API
server, once per process (measured: see docs/security.md).

>>> _derived_id("0" * 64)
'd-4b50df8e38c9'
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from airflow_ray import config

log = logging.getLogger(__name__)

#: The Airflow Variable holding the deployment's secret ("secret" in the name: Airflow masks it).
VARIABLE = "airflow_ray_deployment_secret"
#: What a deployment id may look like: it becomes part of Ray actor names.
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_SECRET_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Deployment:
    """This deployment's id (public: in actor names and references) and signing key (secret)."""

    id: str
    key: bytes = field(repr=False)


@config._accessor
def current() -> Deployment:
    """This process's deployment, read once per process (cleared with ``config.clear_caches``).

    :raises ValueError: when ``[ray] deployment_id`` or the stored secret is malformed.
    """
    secret = _secret()
    configured = config.deployment_id()
    name = validate_id(configured, source="[ray] deployment_id") if configured else _derived_id(secret)
    return Deployment(id=name, key=bytes.fromhex(secret))


def validate_id(value: str, *, source: str) -> str:
    """A deployment id, or a clear error naming where the bad one came from."""
    if not ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{source} is {value!r}: a deployment id is 1-40 characters of lowercase letters, "
            "digits and '-', starting with a letter or digit (it becomes part of Ray actor names)."
        )
    return value


def init() -> tuple[Deployment, bool]:
    """Create the secret if the deployment has none; ``(deployment, created)``. Needs DB access."""
    created = _read_secret() is None
    current.cache_clear()  # type: ignore[attr-defined]
    return current(), created


def _secret() -> str:
    """The stored secret, created on first use.

    The scheduler creates it as it starts (:mod:`airflow_ray.listener`), before it queues any
    task. Without a scheduler (``dag.test()``, ``airflow tasks test``) the first task creates it;
    two such processes of a brand-new deployment may both find none and both create one (each
    reads the Variable back and uses what is stored, which narrows the race to the moment between
    the two writes). ``airflow-ray deployment`` (or a secrets backend) avoids it altogether.
    """
    value = _read_secret()
    if value is None:
        _write_secret(secrets.token_hex(32))
        log.warning(
            "Created the Airflow Variable %s: this deployment's airflow-ray identity. Keep it: "
            "outputs referenced from XCom rows are only readable with it.",
            VARIABLE,
        )
        value = _read_secret()
    if value is None or not _SECRET_PATTERN.fullmatch(value):
        raise ValueError(
            f"The Airflow Variable {VARIABLE} must hold 64 hex characters (32 random bytes); "
            "delete it and run `airflow-ray deployment` to create a new one (outputs signed with "
            "the old one become unreadable)."
        )
    return value


def _derived_id(secret: str) -> str:
    return "d-" + hashlib.sha256(b"airflow-ray deployment id\0" + secret.encode()).hexdigest()[:12]


def _read_secret() -> str | None:
    value: Any = _variables().get(VARIABLE, None)  # positional: the two APIs name it differently
    return None if value is None else str(value).strip()


def _write_secret(value: str) -> None:
    _variables().set(VARIABLE, value, description="airflow-ray: this deployment's identity and signing key")


def _variables() -> Any:
    """Airflow's Variables: through the API server inside a task (Task SDK), else the metadata DB
    and secrets backends (the CLI, the keeper), where the Task SDK would only see the environment."""
    from airflow.sdk.execution_time import task_runner

    if getattr(task_runner, "SUPERVISOR_COMMS", None) is not None:
        from airflow.sdk import Variable

        return Variable
    from airflow.models.variable import Variable as MetadataVariable

    return MetadataVariable
