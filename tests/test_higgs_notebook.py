"""The HIGGS notebook runs top to bottom (nbclient, a real kernel, a real Ray) on small data.

The kernel is a driver of the session's Ray head (its address as the notebook's ``RAY_ADDRESS``
parameter), as a notebook on a cluster would be: no private cold start in the kernel (CI time).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebooks" / "higgs_xgboost.ipynb"


def _inject_after_parameters(nb: nbformat.NotebookNode, source: str) -> None:
    """Papermill-style: a cell right after the one tagged ``parameters`` overrides its values."""
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))


def test_notebook_trains_and_evaluates(ray_cluster, tmp_path):
    from airflow_ray.cluster import LOCAL_ENV

    kernel_env = {
        **os.environ,
        **LOCAL_ENV,  # what a driver of the embedded cluster needs (loopback, the token)
        "AIRFLOW_RAY_EXAMPLES_STORAGE": str(tmp_path / "storage"),
    }
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The session's head, never a cluster someone else started on this machine ("auto" could be).
    params = f"N_ROWS = 6_000\nNUM_BOOST_ROUND = 20\nRAY_ADDRESS = {ray_cluster.address!r}"
    _inject_after_parameters(nb, params)
    nb.cells.insert(-1, nbformat.v4.new_code_cell("import json\nprint('METRICS=' + json.dumps(metrics))"))

    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute(env=kernel_env)

    stdout = "".join(
        out.get("text", "")
        for cell in nb.cells
        for out in cell.get("outputs", [])
        if out.get("name") == "stdout"
    )
    metrics = json.loads(stdout.split("METRICS=", 1)[1].splitlines()[0])
    assert metrics["n_test"] == 1_200  # a 20 % split of 6,000 rows
    # Synthetic HIGGS is learnable but noisy: well above chance, well below perfect.
    assert 0.6 < metrics["accuracy"] < 0.9
    assert 0.65 < metrics["auc"] < 0.95
    model_file = Path(metrics["model_uri"].removeprefix("file://"))
    assert model_file.is_file() and model_file.is_relative_to(tmp_path)
