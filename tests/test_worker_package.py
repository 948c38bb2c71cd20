"""``airflow_ray._worker`` runs on Ray without airflow-ray installed: it must import none of the rest.

The package is shipped to the cluster by value, module by module. An import of Airflow, or of an
``airflow_ray`` module outside ``_worker``, anywhere in it (at module level, inside a function,
under ``TYPE_CHECKING``) would fail there, or quietly pull in code that the hash in the owner
actors' names does not cover. Read with ``ast``, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
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


# Pickles, by value as ``ship_worker_code`` has it, every function and class of the package plus
# a checkpoint location, as the Airflow side would send them.
_SHIP = """
import importlib, inspect, pkgutil, sys
import ray.cloudpickle as cloudpickle
import airflow_ray._worker as worker
from airflow_ray._worker.checkpoint import CheckpointLocation

cloudpickle.register_pickle_by_value(worker)
shipped = {}
for info in pkgutil.walk_packages(worker.__path__, worker.__name__ + "."):
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
        defined_here = getattr(obj, "__module__", None) == info.name
        if defined_here and (inspect.isfunction(obj) or inspect.isclass(obj)):
            shipped[f"{info.name}.{name}"] = obj
location = CheckpointLocation(sys.argv[2], producer={"airflow_ray": "shipped"})
with open(sys.argv[1], "wb") as f:
    cloudpickle.dump((shipped, location), f)
"""

# Loads them where ``airflow`` and ``airflow_ray`` cannot be imported, as on a cluster with only
# Ray and the data libraries, and writes and reads a checkpoint of each format with them.
_RUN_WITHOUT_AIRFLOW_RAY = """
import importlib.abc, pickle, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in ("airflow", "airflow_ray"):
            raise ModuleNotFoundError(f"No module named {name!r} on this cluster")

sys.meta_path.insert(0, NotInstalled())
for name in [m for m in sys.modules if m.partition(".")[0] in ("airflow", "airflow_ray")]:
    del sys.modules[name]
import numpy as np, pandas as pd, pyarrow as pa

with open(sys.argv[1], "rb") as f:
    shipped, location = pickle.load(f)
write = shipped["airflow_ray._worker.checkpoint.io.write_checkpoint"]
read = shipped["airflow_ray._worker.checkpoint.io.read_checkpoint"]
for value in (pd.DataFrame({"a": [1, 2]}), pa.table({"a": [1]}), np.arange(5), {"k": "v"}):
    manifest = write(value, location)
    assert manifest["producer"]["airflow_ray"] == "shipped", manifest
    back = read(location, expected_format=manifest["format"], expected_digest=manifest["checksum"])
    assert type(back) is type(value) and repr(back) == repr(value), (back, value)
print(len(shipped), "ok")
"""


def test_shipped_package_runs_where_airflow_ray_is_not_installed(tmp_path: Path):
    blob = tmp_path / "shipped.pkl"
    for script, *args in (
        (_SHIP, blob, f"{tmp_path.as_uri()}/d/r/t/-1/"),
        (_RUN_WITHOUT_AIRFLOW_RAY, blob),
    ):
        result = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=Path(__file__).resolve().parents[1],
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


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
