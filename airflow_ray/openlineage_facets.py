"""The ``ray`` run facet of OpenLineage events (needs ``airflow-ray[openlineage]``).

Imported only by :func:`airflow_ray.lineage.operator_lineage`, i.e. when Airflow's OpenLineage
listener asks an airflow-ray operator for lineage: this module imports OpenLineage, which the
rest of airflow-ray never requires.
"""

from __future__ import annotations

from typing import Any

import attr
from openlineage.client.facet_v2 import RunFacet

from airflow_ray._api import public_api
from airflow_ray.version import __version__

#: Where the facet's fields are described (OpenLineage wants a schema URL per custom facet).
SCHEMA_URL = f"https://pypi.org/project/airflow-ray/{__version__}/#RayRunFacet"


@public_api("alpha")
@attr.define
class RayRunFacet(RunFacet):
    """What ran on Ray for one task instance: the ``ray`` facet of its run events.

    ``kind`` is ``"task"`` (``@ray_task``) or ``"job"`` (``RaySubmitJobOperator``); ``jobId`` the
    Ray Job's submission id; ``owner`` the owner actor that submitted a task and holds its
    outputs; ``nodeId`` the Ray node it ran on; ``resources`` what was requested, under Ray's
    names; ``outputs`` one entry per output (``key``, ``type``, ``bytes``, ``rows``/``shape``,
    ``objectId`` or ``inline``); ``dashboardUrl`` the cluster's dashboard and ``pageUrl`` this job's
    or owner's page in it. Unknown values are ``null`` (e.g. a task that failed before it ran).
    """

    kind: str  # field names in camelCase, as OpenLineage spells them
    jobId: str | None = None
    owner: str | None = None
    nodeId: str | None = None
    resources: dict[str, Any] = attr.field(factory=dict)
    outputs: list[dict[str, Any]] = attr.field(factory=list)
    dashboardUrl: str | None = None
    pageUrl: str | None = None

    #: Names and URLs are no secrets: keep them out of the client's redaction.
    _additional_skip_redact = ["kind", "jobId", "owner", "nodeId", "dashboardUrl", "pageUrl"]

    @staticmethod
    def _get_schema() -> str:
        return SCHEMA_URL
