"""The HIGGS DAG is the notebook plus decorators: its task functions' bodies are the notebook's.

``docs/notebook-to-dag.md`` shows the difference as "decorators and the ``@dag`` wiring only";
this test is what makes that claim trustworthy.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOK = EXAMPLES / "notebooks" / "higgs_xgboost.ipynb"
DAG_FILE = EXAMPLES / "dags" / "higgs_xgboost.py"
STEPS = ("load_data", "split", "train", "evaluate")


def _functions(source: str) -> dict[str, ast.FunctionDef]:
    return {
        node.name: node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name in STEPS
    }


def _without_decorators(fn: ast.FunctionDef) -> str:
    """The function as the AST sees it (signature, docstring, body), minus its decorators."""
    fn = ast.FunctionDef(**{**{f: getattr(fn, f) for f in fn._fields}, "decorator_list": []})
    return ast.dump(fn, include_attributes=False)


@pytest.fixture(scope="module")
def notebook_functions() -> dict[str, ast.FunctionDef]:
    cells = nbformat.read(NOTEBOOK, as_version=4).cells
    return _functions("\n\n".join(c.source for c in cells if c.cell_type == "code"))


@pytest.fixture(scope="module")
def dag_functions() -> dict[str, ast.FunctionDef]:
    return _functions(DAG_FILE.read_text())


def test_every_step_is_in_both(notebook_functions, dag_functions):
    assert set(notebook_functions) == set(STEPS)
    assert set(dag_functions) == set(STEPS)


@pytest.mark.parametrize("name", STEPS)
def test_bodies_identical(name, notebook_functions, dag_functions):
    assert _without_decorators(notebook_functions[name]) == _without_decorators(dag_functions[name])


def test_notebook_functions_are_plain_and_dag_functions_are_ray_tasks(notebook_functions, dag_functions):
    assert all(not fn.decorator_list for fn in notebook_functions.values())
    for fn in dag_functions.values():
        decorators = [ast.unparse(d) for d in fn.decorator_list]
        assert len(decorators) == 1 and decorators[0].startswith("ray_task"), (fn.name, decorators)


def test_the_comparison_sees_a_change():
    """Guard against a comparison that passes vacuously: one changed constant must show."""
    fn = _functions(DAG_FILE.read_text())["split"]
    before = _without_decorators(fn)
    changed = _functions(
        DAG_FILE.read_text().replace("test_fraction: float = 0.2", "test_fraction: float = 0.3")
    )
    assert _without_decorators(changed["split"]) != before
