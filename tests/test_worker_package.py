"""``airflow_ray._worker`` runs on Ray without airflow-ray installed: it must import none of the rest.

The package is shipped to the cluster by value, module by module. An import of Airflow, or of an
``airflow_ray`` module outside ``_worker``, anywhere in it (at module level, inside a function,
under ``TYPE_CHECKING``) would fail there, or quietly pull in code that the hash in the owner
actors' names does not cover. Read with ``ast``, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import airflow_ray._worker

WORKER_ROOT = Path(airflow_ray._worker.__file__).parent
WORKER_PACKAGE = "airflow_ray._worker"


def forbidden_imports(source: str, module: str, *, is_package: bool = False) -> list[str]:
    """``"line N: name"`` for each import in ``source`` (the code of ``module``) that leaves the package."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node.module, node.level, package)
            # ``from airflow_ray import x`` imports the module airflow_ray.x (or a name of airflow_ray)
            names = [f"{base}.{alias.name}" for alias in node.names] if base == "airflow_ray" else [base]
        elif _is_dynamic_import(node):
            names = [node.args[0].value]
        else:
            continue
        found += [f"line {node.lineno}: {name}" for name in names if _is_forbidden(name)]
    return found


def _absolute(name: str | None, level: int, package: str) -> str:
    if not level:
        return name or ""
    parts = package.split(".")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{name}" if name else base


def _is_dynamic_import(node: ast.AST) -> bool:
    """``importlib.import_module("...")`` or ``__import__("...")`` with a literal name."""
    if not isinstance(node, ast.Call) or not node.args:
        return False
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    first = node.args[0]
    return (
        called in ("import_module", "__import__")
        and isinstance(first, ast.Constant)
        and isinstance(first.value, str)
    )


def _is_forbidden(name: str) -> bool:
    def within(package: str) -> bool:
        return name == package or name.startswith(package + ".")

    return within("airflow") or (within("airflow_ray") and not within(WORKER_PACKAGE))


def _module_name(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(WORKER_ROOT).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join((WORKER_PACKAGE, *parts[: -1 if is_package else None])), is_package


WORKER_FILES = sorted(WORKER_ROOT.rglob("*.py"))


def test_worker_package_has_the_ray_side_modules():
    modules = {_module_name(path)[0] for path in WORKER_FILES}
    assert {
        "airflow_ray._worker.owner",
        "airflow_ray._worker.runner",
        "airflow_ray._worker.serving",
        "airflow_ray._worker.tracking",
        "airflow_ray._worker.checkpoint",
        "airflow_ray._worker.checkpoint.io",
    } <= modules


@pytest.mark.parametrize("path", WORKER_FILES, ids=lambda p: str(p.relative_to(WORKER_ROOT)))
def test_worker_module_imports_nothing_outside_the_package(path: Path):
    module, is_package = _module_name(path)
    assert forbidden_imports(path.read_text(), module, is_package=is_package) == []


@pytest.mark.parametrize(
    "source",
    [
        "import airflow",
        "import airflow.sdk as sdk",
        "from airflow.sdk import BaseHook",
        "def f():\n    from airflow_ray import config",
        "if TYPE_CHECKING:\n    from airflow_ray.store import ObjectReference",
        "from airflow_ray import _worker, checkpoint",
        "from ... import store",  # airflow_ray.store, from airflow_ray._worker.checkpoint.io
        "from ...version import __version__",
        "importlib.import_module('airflow_ray.tasks')",
    ],
)
def test_check_catches_imports_that_leave_the_package(source: str):
    assert forbidden_imports(source, "airflow_ray._worker.checkpoint.io")


@pytest.mark.parametrize(
    "source",
    [
        "import os, ray, numpy",
        "from . import streams",
        "from .. import runner",
        "from .streams import BLOCK_SIZE",
        "from airflow_ray._worker import runner",
        "from airflow_ray import _worker",
        "import airflow_rayish",
        "import_module(name)",
    ],
)
def test_check_allows_imports_within_the_package(source: str):
    assert forbidden_imports(source, "airflow_ray._worker.checkpoint.io") == []
