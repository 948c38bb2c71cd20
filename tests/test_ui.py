"""The Airflow UI, driven by a real headless Chromium, on a real deployment running the examples.

What a user sees: the example DAGs in the list, a triggered run of each succeeding (the Ray Job
one deferred to the real triggerer), the readable JSON reference that a Ray task's XCom holds,
and the "Ray Dashboard" button on a Ray Job task and on a ``@ray_task`` task. Screenshots are
saved under the directory the test prints (``AIRFLOW_RAY_SCREENSHOTS`` to choose it).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.error
import urllib.request
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
    """Chromium logged in as the admin: the token from ``/auth/token`` in the UI's cookie, as the
    login page leaves it."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1440, "height": 900})
        context.add_cookies(
            [{"name": "_token", "value": airflow_services.token(), "url": airflow_services.url}]
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        # Assertions wait as long as actions: the UI renders slowly beside the suite's other
        # tests on 2 cores (the 5 s default failed "return_value" in a fresh-machine CI run).
        sync_api.expect.set_options(timeout=60_000)
        yield page
        browser.close()


def test_dag_list_shows_the_examples(airflow_services, page, screenshots):
    from playwright.sync_api import expect

    for dag_id in EXAMPLE_DAGS:
        airflow_services.wait_for_dag(dag_id)
    page.goto(f"{airflow_services.url}/dags")
    for dag_id in EXAMPLE_DAGS:  # the first page of a login session loads for a while under load
        expect(page.get_by_text(dag_id, exact=True).first).to_be_visible()
    page.screenshot(path=screenshots / "dags.png", full_page=True)


def test_runs_succeed_and_the_graph_shows_them(airflow_services, runs, page, screenshots):
    from playwright.sync_api import expect

    page.goto(f"{airflow_services.url}/dags/example_ray_basics/runs/{runs['example_ray_basics']}")
    # The run's tasks are listed in either view; once they are, so is the view switch (if any).
    # Counting the buttons before the page has rendered found none and stayed on the grid.
    expect(page.get_by_text("summarize").first).to_be_visible()
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
    expect(link).to_be_visible()
    href = link.get_attribute("href")
    assert href.startswith("http://127.0.0.1:") and target in href, href
    page.screenshot(path=screenshots / f"dashboard_link_{task_id}.png", full_page=True)


# --- the Ray view (airflow_ray.ui): its tests free example_ray_basics' run, so they come last ------


def _ray_view(airflow_services, method: str, path: str, *, user: str | None = None, headers=None):
    """Call the Ray view's API (``/airflow-ray/api/...``): (status, JSON body)."""
    headers = {
        **(headers or {}),
        **({"Authorization": f"Bearer {airflow_services.token(user)}"} if user else {}),
    }
    request = urllib.request.Request(
        f"{airflow_services.url}/airflow-ray/api/{path}", headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_ray_view_shows_the_runs_outputs_the_cluster_and_a_chart(airflow_services, runs, page, screenshots):
    """The "Ray" tab of a run in the Airflow UI: its page in the UI's frame, filled from the JSON."""
    from playwright.sync_api import expect

    run_id = runs["example_ray_basics"]
    page.goto(f"{airflow_services.url}/dags/example_ray_basics/runs/{run_id}/plugin/ray")  # the tab's URL
    tab = page.get_by_role("link", name="Ray", exact=True)  # the run's tabs are links
    expect(tab).to_have_attribute("href", re.compile(r"/plugin/ray$"))
    view = page.frame_locator("iframe").first
    outputs = view.locator("#outputs tbody tr")
    expect(outputs.filter(has_text="simulate")).to_have_count(4)  # the 4 mapped arrays
    expect(outputs.filter(has_text="simulate").first).to_contain_text("object store")
    expect(view.locator("#totals")).to_contain_text("4 in the object store")
    expect(view.locator("#nodes tbody tr").first).to_contain_text("yes")
    expect(view.locator("#owners tbody tr").first).to_contain_text("answering")
    expect(view.locator("#store-chart .run-bar").first).to_be_visible()
    page.screenshot(path=screenshots / "ray_view_tab.png", full_page=True)
    page.goto(f"{airflow_services.url}/airflow-ray/runs/example_ray_basics/{run_id}")  # the page alone
    expect(page.locator("#store-chart .run-bar").first).to_be_visible()
    expect(page.locator("#outputs tbody tr").filter(has_text="simulate")).to_have_count(4)
    page.screenshot(path=screenshots / "ray_view.png", full_page=True)


def test_ray_view_checks_who_may_read_and_who_may_free(airflow_services, runs):
    run = f"example_ray_basics/{runs['example_ray_basics']}"
    status, body = _ray_view(airflow_services, "GET", f"runs/{run}")
    assert status == 401, body  # no token, no cookie
    status, body = _ray_view(airflow_services, "GET", f"runs/{run}", user="viewer")
    assert status == 200, body  # a viewer may read the DAG
    simulated = [o for o in body["outputs"] if o["task_id"] == "simulate"]
    assert len(simulated) == 4 and all(o["where"] == "object store" and o["node"] for o in simulated)
    assert body["totals"]["object_store_bytes"] >= 4 * 2_000_000
    status, body = _ray_view(airflow_services, "POST", f"free/{run}", user="viewer")
    assert status == 403 and "may not free the Ray objects" in body["detail"], body
    status, body = _ray_view(  # the admin's cookie alone, as a form posted from another page sends it
        airflow_services, "POST", f"free/{run}", headers={"Cookie": f"_token={airflow_services.token()}"}
    )
    assert status == 403 and "X-Airflow-Ray-Request" in body["detail"], body
    status, body = _ray_view(airflow_services, "GET", "runs/example_ray_basics/no-such-run", user="viewer")
    assert status == 404 and "has no run 'no-such-run'" in body["detail"], body
    status, body = _ray_view(airflow_services, "GET", f"runs/{run}", user="viewer")
    assert all(o["where"] == "object store" for o in body["outputs"] if o["task_id"] == "simulate")  # kept


def test_ray_view_frees_a_run_for_an_admin(airflow_services, runs, page, screenshots):
    """The button in the page (the admin's cookie plus the page's header) frees the run's arrays,
    says what it freed, and the run leaves the chart."""
    from playwright.sync_api import expect

    run_id = runs["example_ray_basics"]
    run = f"example_ray_basics/{run_id}"
    _, before = _ray_view(airflow_services, "GET", f"runs/{run}", user="viewer")
    page.goto(f"{airflow_services.url}/airflow-ray/runs/{run}")
    expect(page.locator("#outputs tbody tr").filter(has_text="simulate")).to_have_count(4)
    page.get_by_role("button", name="Free this run's objects").click()
    expect(page.locator("#freed")).to_contain_text("Freed 4 objects")
    expect(page.locator("#totals")).to_contain_text("4 not held")
    page.screenshot(path=screenshots / "ray_view_freed.png", full_page=True)
    _, after = _ray_view(airflow_services, "GET", f"runs/{run}", user="viewer")
    assert after["totals"]["object_store_bytes"] == 0 < before["totals"]["object_store_bytes"]
    _, cluster = _ray_view(airflow_services, "GET", "cluster", user="viewer")
    assert not [r for r in cluster["runs"] if (r["dag_id"], r["run_id"]) == ("example_ray_basics", run_id)]
