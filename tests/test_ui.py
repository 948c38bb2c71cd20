"""The Airflow UI, driven by a real headless Chromium, on a real deployment running the examples.

What a user sees: the example DAGs in the list, a triggered run of each succeeding (the Ray Job
one deferred to the real triggerer), the readable JSON reference that a Ray task's XCom holds,
and the "Ray Dashboard" button on a Ray Job task and on a ``@ray_task`` task. Screenshots are
saved under the directory the test prints (``AIRFLOW_RAY_SCREENSHOTS`` to choose it).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import pytest

from airflow_ray.references import REFERENCE_FORMAT_VERSION
from tests.conftest import EXAMPLE_DAGS

CHROMIUM = "/usr/bin/chromium"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed"),
]


@pytest.fixture(scope="module")
def screenshots() -> Path:
    path = Path(os.environ.get("AIRFLOW_RAY_SCREENSHOTS") or tempfile.mkdtemp(prefix="airflow-ray-ui-"))
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nUI screenshots: {path}")
    return path


@pytest.fixture(scope="module")
def runs(airflow_services) -> dict[str, str]:
    """One successful run of each example DAG (triggered together, so they overlap)."""
    run_ids = {dag_id: f"ui_{dag_id}" for dag_id in EXAMPLE_DAGS}
    for dag_id, run_id in run_ids.items():
        airflow_services.trigger(dag_id, run_id)
    for dag_id, run_id in run_ids.items():
        airflow_services.wait_for_run(dag_id, run_id)
    return run_ids


@pytest.fixture(scope="module")
def page(airflow_services):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1440, "height": 900})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def test_dag_list_shows_the_examples(airflow_services, page, screenshots):
    from playwright.sync_api import expect

    for dag_id in EXAMPLE_DAGS:
        airflow_services.wait_for_dag(dag_id)
    page.goto(f"{airflow_services.url}/dags")
    for dag_id in EXAMPLE_DAGS:
        expect(page.get_by_text(dag_id, exact=True).first).to_be_visible()
    page.screenshot(path=screenshots / "dags.png", full_page=True)


def test_runs_succeed_and_the_graph_shows_them(airflow_services, runs, page, screenshots):
    from playwright.sync_api import expect

    page.goto(f"{airflow_services.url}/dags/example_ray_basics/runs/{runs['example_ray_basics']}")
    # The run's tasks are listed in either view; once they are, so is the view switch (if any).
    # Counting the buttons before the page has rendered found none and stayed on the grid.
    expect(page.get_by_text("summarize").first).to_be_visible(timeout=60_000)
    graph = page.get_by_role("button", name=re.compile("graph", re.IGNORECASE))
    if graph.count():
        graph.first.click()
    expect(page.locator(".react-flow__node").filter(has_text="summarize").first).to_be_visible()
    expect(page.get_by_text("Success").first).to_be_visible()
    page.screenshot(path=screenshots / "dag_graph.png", full_page=True)


def test_ray_task_xcom_shows_the_readable_reference(airflow_services, runs, page, screenshots):
    from playwright.sync_api import expect

    run_id = runs["example_ray_basics"]
    reference = airflow_services.xcom("example_ray_basics", run_id, "simulate", map_index=0)
    assert reference["__airflow_ray__"] == REFERENCE_FORMAT_VERSION  # a reference, not the 2 MB array
    url = f"{airflow_services.url}/dags/example_ray_basics/runs/{run_id}/tasks/simulate/mapped/0/xcom"
    # Under load the XCom table sometimes first renders an empty value ("{}") that never fills
    # in; a reload fetches it again. Three loads at most, the first one given less time.
    for attempt, timeout_ms in enumerate((10_000, 30_000, 30_000)):
        page.goto(url)
        expect(page.get_by_text("return_value").first).to_be_visible()
        try:
            expect(page.locator("body")).to_contain_text("__airflow_ray__", timeout=timeout_ms)  # the JSON
            break
        except AssertionError:
            if attempt == 2:
                raise
    page.screenshot(path=screenshots / "ray_task_xcom.png", full_page=True)


@pytest.mark.parametrize(
    "dag_id, task_id, target",
    [
        pytest.param("example_ray_job", "estimate_pi", "#/jobs/airflow-example_ray_job.", id="ray-job"),
        pytest.param("example_ray_basics", "summarize", "#/actors/", id="ray-task"),
    ],
)
def test_ray_dashboard_link(airflow_services, runs, page, screenshots, dag_id, task_id, target):
    from playwright.sync_api import expect

    page.goto(f"{airflow_services.url}/dags/{dag_id}/runs/{runs[dag_id]}/tasks/{task_id}/details")
    link = page.get_by_role("link", name="Ray Dashboard")
    expect(page.get_by_text(task_id).first).to_be_visible()
    page.screenshot(path=screenshots / f"dashboard_link_{task_id}.png", full_page=True)
    expect(link).to_be_visible(timeout=60_000)
    href = link.get_attribute("href")
    assert href.startswith("http://127.0.0.1:") and target in href, href
    page.screenshot(path=screenshots / f"dashboard_link_{task_id}.png", full_page=True)
