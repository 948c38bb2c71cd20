"""The Ray view's one HTML page: a shell that ``ray.js`` fills from the JSON endpoints.

Server-rendered with nothing but where the API is and which run to show (escaped); every number
on the page comes from :mod:`airflow_ray.ui.api`'s JSON, built into the page with DOM calls
(``textContent``, never ``innerHTML``), and so does the chart (inline SVG). No build step.

>>> "data-run-id=\\"a&amp;b\\"" in render("/airflow-ray", "etl", "a&b")
True
"""

from __future__ import annotations

import html
from pathlib import Path
from string import Template

_TEMPLATE = Template(Path(__file__).with_name("page.html").read_text())


def render(base: str, dag_id: str | None = None, run_id: str | None = None) -> str:
    """The page for one DAG run (its outputs, then the cluster), or for the cluster alone."""
    return _TEMPLATE.substitute(
        base=html.escape(base),
        dag_id=html.escape(dag_id or ""),
        run_id=html.escape(run_id or ""),
        title=html.escape(f"Ray: {dag_id} / {run_id}" if dag_id else "Ray cluster"),
    )
