"""OpenLineage for Ray tasks: what ran on Ray, where, with what, and the checkpoints it read and wrote.

With ``apache-airflow-providers-openlineage`` installed (``pip install airflow-ray[openlineage]``)
and a transport configured, Airflow's OpenLineage listener emits a START and a COMPLETE (or FAIL)
event per task instance. It asks the operator for lineage through the provider's extension
points, ``get_openlineage_facets_on_start/complete/failure``, which :class:`RayLineageMixin`
gives ``RayPythonOperator`` (``@ray_task``) and ``RaySubmitJobOperator``. Each event then carries:

* a run facet ``ray`` (:class:`airflow_ray.openlineage_facets.RayRunFacet`): the Ray job or the
  owner actor that ran the task, the node it ran on, the resources requested, the size of each
  output, the Ray dashboard URL;
* checkpoints as datasets: the checkpoints of the task's inputs as ``inputs``, the checkpoints
  it wrote as ``outputs`` (with row count and digest).

This module imports nothing from OpenLineage: the listener calls the methods only where the
provider is installed, and only then is :mod:`airflow_ray.openlineage_facets` imported. What an
operator knows is collected in a plain :class:`RayLineage` as it runs (the listener reads it in
a forked process after ``execute``, so reading it must not touch Ray or the network).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_ray.references import ObjectReference


@dataclasses.dataclass
class RayLineage:
    """What one task instance did on Ray, as far as it got (filled while it runs)."""

    #: ``"task"`` (a ``@ray_task``) or ``"job"`` (a Ray Job).
    kind: str
    #: Resources requested, under Ray's names (``num_cpus``, ``entrypoint_num_cpus``...).
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: The Ray Job's submission id.
    job_id: str | None = None
    #: The owner actor that submitted a ``@ray_task``'s function and holds its outputs.
    owner: str | None = None
    #: The Ray node the function (or the job's driver) ran on.
    node_id: str | None = None
    #: The cluster's dashboard, and the page of this job or owner actor in it.
    dashboard_url: str | None = None
    page_url: str | None = None
    #: One entry per output: ``key``, ``bytes``, ``type``, ``rows``/``shape`` where known,
    #: ``objectId`` (kept in Ray) or ``inline`` (small: stored in the XCom table).
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    #: Checkpointed upstream outputs the task read, and the checkpoints it wrote.
    read: list[ObjectReference] = dataclasses.field(default_factory=list)
    written: list[ObjectReference] = dataclasses.field(default_factory=list)


class RayLineageMixin:
    """The OpenLineage provider's extension points, from the operator's ``ray_lineage``."""

    ray_lineage: RayLineage

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        return operator_lineage(self.ray_lineage)

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        return operator_lineage(self.ray_lineage)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> OperatorLineage:
        return operator_lineage(self.ray_lineage)


def operator_lineage(lineage: RayLineage) -> OperatorLineage:
    """The provider's ``OperatorLineage`` for ``lineage`` (imports OpenLineage)."""
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import dataset_version_dataset, output_statistics_output_dataset

    from airflow_ray.openlineage_facets import RayRunFacet

    facet = RayRunFacet(
        kind=lineage.kind,
        jobId=lineage.job_id,
        owner=lineage.owner,
        nodeId=lineage.node_id,
        resources=lineage.resources,
        outputs=lineage.outputs,
        dashboardUrl=lineage.dashboard_url,
        pageUrl=lineage.page_url,
    )
    inputs = [
        InputDataset(namespace=namespace, name=name, facets=_version(reference, dataset_version_dataset))
        for reference in _checkpointed(lineage.read)
        for namespace, name in [dataset_name(reference.checkpoint_uri or "")]
    ]
    outputs = [
        OutputDataset(
            namespace=namespace,
            name=name,
            facets=_version(reference, dataset_version_dataset),
            outputFacets={
                "outputStatistics": output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
                    rowCount=reference.summary.get("rows")
                )
            },
        )
        for reference in _checkpointed(lineage.written)
        for namespace, name in [dataset_name(reference.checkpoint_uri or "")]
    ]
    return OperatorLineage(inputs=inputs, outputs=outputs, run_facets={"ray": facet})


def dataset_name(uri: str) -> tuple[str, str]:
    """OpenLineage's (namespace, name) of a checkpoint directory, as its naming spec has them for
    object storage: ``s3://bucket`` + ``path/to/dir``; ``file`` + ``/abs/path``."""
    scheme, _, rest = uri.partition("://")
    netloc, _, path = rest.partition("/")
    path = path.rstrip("/")
    if scheme == "file":
        return "file", f"/{path}"
    return f"{scheme}://{netloc}", path


def output_entry(key: str, summary: dict[str, Any], object_id: str | None) -> dict[str, Any]:
    """The run facet's line for one output (sizes from the summary the Ray worker computed)."""
    entry = {"key": key, "type": summary.get("type"), "bytes": summary.get("bytes")}
    entry.update({k: summary[k] for k in ("rows", "shape") if k in summary})
    return {**entry, "objectId": object_id} if object_id else {**entry, "inline": True}


def _checkpointed(references: Iterable[ObjectReference]) -> list[ObjectReference]:
    return [r for r in references if r.checkpoint_uri]


def _version(reference: ObjectReference, facets: Any) -> dict[str, Any]:
    """The checkpoint's digest as the dataset's version: equal digests, equal data."""
    if not reference.checkpoint_digest:
        return {}
    return {"version": facets.DatasetVersionDatasetFacet(datasetVersion=reference.checkpoint_digest)}
