"""Checkpointed outputs as Airflow Assets: other DAGs can be scheduled on them.

.. code-block:: python

    from airflow.sdk import DAG, dag
    from airflow_ray import ray_task
    from airflow_ray.assets import CheckpointAsset

    features = CheckpointAsset("s3://lake/features")


    @dag(schedule=None)
    def build():
        @ray_task(checkpoint=True, checkpoint_path=features.uri, outlets=[features])
        def make_features(): ...

        make_features()


    @dag(schedule=[features])  # runs each time make_features has written a new checkpoint
    def train(): ...

A :class:`CheckpointAsset` is an ordinary Airflow ``Asset`` (the scheduler, the UI and a
downstream ``Asset("s3://lake/features")`` see no difference); the subclass only tells airflow-ray
that the task's *checkpoint* is what updates it. The asset names a stable location; each run's
checkpoint is one version under it (``<uri>/<dag_id>/<run_id>/<task_id>/<map_index>/``), and the
asset event says which, with what the checkpoint's manifest knows (:func:`event_extra`), so a
consumer can read exactly that version and check its digest.

Why a subclass rather than "every outlet of a checkpointed task": a task may also update assets
by its own writes; only a declared checkpoint asset can be checked (the task must checkpoint, the
checkpoint must lie under the asset's URI) and get the checkpoint's facts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset

from airflow_ray._api import public_api

if TYPE_CHECKING:
    from airflow.sdk.types import OutletEventAccessorsProtocol


@public_api("beta")
class CheckpointAsset(Asset):
    """An Asset updated by a task's checkpoint: put it in the task's ``outlets``.

    The task must checkpoint its output (``@ray_task(checkpoint=True)``, or a plain ``@task``
    under ``default_args={"checkpoint": True, ...}``) below the asset's URI: give it
    ``checkpoint_path=asset.uri`` (or a base under the URI). Each successful run records an asset
    event whose ``extra`` describes the checkpoint it wrote (:func:`event_extra`).
    Takes ``Asset``'s arguments: ``CheckpointAsset("s3://lake/features")`` or
    ``CheckpointAsset(name="features", uri="s3://lake/features")``.
    """


def declared(outlets: Iterable[Any] | None) -> tuple[CheckpointAsset, ...]:
    """The checkpoint assets among a task's ``outlets`` (other outlets are left to Airflow)."""
    return tuple(outlet for outlet in outlets or () if isinstance(outlet, CheckpointAsset))


def not_checkpointed_error(task_id: str, assets: Iterable[CheckpointAsset]) -> ValueError:
    """The error for checkpoint assets on a task whose output is not checkpointed."""
    names = ", ".join(sorted(repr(a.uri) for a in assets))
    return ValueError(
        f"Task {task_id!r} declares the checkpoint asset(s) {names} in its outlets but does not "
        "checkpoint its output: give it checkpoint=True and checkpoint_path=<the asset's URI> (a "
        "plain @task: default_args={'checkpoint': True, 'checkpoint_path': ...}), or use a plain "
        "Asset if the task writes the data itself."
    )


def check_covered(assets: Iterable[CheckpointAsset], task_id: str, checkpoint_uris: Iterable[str]) -> None:
    """Every checkpoint must lie under every checkpoint asset's URI, or the event would lie.

    Called before the checkpoint is written, so a mismatch costs no write.

    :raises ValueError: naming the asset, the checkpoint's location and the fix.
    """
    for asset in assets:
        prefix = asset.uri.rstrip("/") + "/"
        for uri in checkpoint_uris:
            if not uri.startswith(prefix):
                raise ValueError(
                    f"Task {task_id!r} declares the checkpoint asset {asset.uri!r}, but its "
                    f"checkpoint goes to {uri}, which is not under that URI. Give the task "
                    f"checkpoint_path={asset.uri!r} (or a base below it), or fix the asset's URI."
                )


def event_extra(key: str, uri: str, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What an asset event says about one checkpointed output (from its manifest).

    ``rows`` is present where the format knows it (tables; ``None`` otherwise); ``bytes`` is the
    size of the data file; ``digest`` is the manifest's checksum (``xxh3_128:<hex>``).
    """
    return {
        "key": key,
        "uri": uri,
        "format": manifest["format"],
        "rows": manifest.get("rows"),
        "bytes": manifest["bytes"],
        "digest": manifest["checksum"],
        "python_type": manifest.get("python_type"),
    }


def record(
    assets: Iterable[CheckpointAsset],
    outlet_events: OutletEventAccessorsProtocol,
    extras: Mapping[str, dict[str, Any]],
) -> None:
    """Attach the checkpoints' facts to each asset's event of this task instance.

    One output (the usual case): its facts are the event's ``extra``. ``multiple_outputs``: one
    entry per key under ``"outputs"``, plus their total ``bytes``. A plain task checkpoints its
    keys one push at a time, so facts already recorded for other keys are kept.
    """
    for asset in assets:
        extra: dict[str, Any] = outlet_events[asset].extra  # JSON by construction
        known: dict[str, Any] = extra.get("outputs") or (
            {extra["key"]: dict(extra)} if "key" in extra else {}
        )
        outputs = {**known, **extras}
        extra.clear()
        if len(outputs) == 1:
            extra.update(next(iter(outputs.values())))
        else:
            extra.update(outputs=outputs, bytes=sum(facts["bytes"] for facts in outputs.values()))
