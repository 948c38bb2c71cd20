"""Structure rules of the ``airflow_ray`` package, checked on its source.

* Ray's private APIs are used in :mod:`airflow_ray.compat` only, and the names it uses are listed
  here: after a Ray upgrade this list is what to check in the new Ray's source.
* The package's modules import each other without cycles.
* The public surface is typed (``py.typed``; ``ray_task`` keeps the decorated function's
  parameters for a type checker) and every public name carries a stability mark.
* Every ``[ray]`` option has its default in ``config.OPTIONS`` only.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "airflow_ray"
COMPAT = "airflow_ray.compat"
#: Modules whose every name is private to Ray.
PRIVATE_RAY_MODULES = ("ray._private", "ray._raylet", "ray._common", "ray.core.generated")

#: Every private Ray name airflow_ray uses, all of them in airflow_ray/compat.py. Before moving
#: the Ray bound in pyproject.toml, check each in the new Ray's source (and update this list).
EXPECTED_PRIVATE_RAY_NAMES = [
    "ray._common.pydantic_compat",  # a module alone: imported only (compat.import_driver_modules)
    "ray._common.usage.usage_constants.CLUSTER_METADATA_KEY",
    "ray._common.usage.usage_lib",
    "ray._private.arrow_serialization",
    "ray._private.grpc_utils.init_grpc_channel",
    "ray._private.internal_api.get_memory_info_reply",
    "ray._private.internal_api.get_state_from_address",
    "ray._private.ray_constants.ENABLE_RAY_CLUSTER",
    "ray._private.ray_constants.KV_NAMESPACE_CLUSTER",
    "ray._private.services.canonicalize_bootstrap_address",
    "ray._private.utils.check_version_info",
    "ray._private.worker",  # a module alone: its _global_node (compat.cluster_started_in_this_process)
    "ray._raylet.AuthenticationTokenLoader.instance",
    "ray._raylet.Config.initialize",
    "ray.core.generated.common_pb2.NodeDeathInfo.Reason.Name",
    "ray.core.generated.gcs_service_pb2.InternalKVGetRequest",
    "ray.core.generated.gcs_service_pb2_grpc.InternalKVGcsServiceStub",
    "ray.core.generated.ray_client_pb2.ClusterInfoRequest",
    "ray.core.generated.ray_client_pb2.ClusterInfoType.PING",
    "ray.core.generated.ray_client_pb2_grpc.RayletDriverStub",
]


def test_private_ray_names_in_use():
    modules = _parse_package()
    own_names = _names_defined_in(modules.values())
    outside = {
        name: sorted(_private_ray_names(source, own_names))
        for name, source in modules.items()
        if name != COMPAT and _private_ray_names(source, own_names)
    }
    assert not outside, (
        f"Private Ray APIs outside {COMPAT}: {outside}. Wrap each in a small function in "
        "airflow_ray/compat.py, with a docstring naming the private API and why it is needed."
    )
    assert sorted(_private_ray_names(modules[COMPAT], own_names)) == EXPECTED_PRIVATE_RAY_NAMES


def test_compat_is_checked_against_the_bounded_ray_version():
    """pyproject's Ray bound and every compat function's docstring name the version compat was
    checked against, so an upgrade cannot move one without the others."""
    from airflow_ray import compat

    major, minor = compat.CHECKED_RAY_VERSION.split(".")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(d for d in dependencies if d.startswith("ray[default]"))
    assert ray.endswith(f">={major}.{minor}.0,<{major}.{int(minor) + 1}"), ray
    functions = [f for name, f in vars(compat).items() if callable(f) and f.__module__ == COMPAT]
    assert functions
    unchecked = [f.__name__ for f in functions if f"Ray {compat.CHECKED_RAY_VERSION}" not in f.__doc__]
    assert not unchecked, f"compat functions that do not say which Ray they were checked against: {unchecked}"


def test_no_import_cycles():
    """Every import counts: module level, inside functions, and under ``TYPE_CHECKING``."""
    graph = _import_graph(_parse_package())
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(_describe_cycle(graph, c) for c in cycles)


def test_ray_task_keeps_the_function_signature_for_type_checkers(tmp_path):
    """mypy sees through ``@ray_task`` (bare or with options) to the function's parameters."""
    sample = tmp_path / "typed_dag.py"
    sample.write_text(
        "from airflow_ray import ray_task\n"
        "\n"
        "@ray_task\n"
        "def square(x: int) -> int:\n"
        "    return x * x\n"
        "\n"
        "@ray_task(num_cpus=1, retries=2)\n"
        "def label(name: str, *, upper: bool = False) -> str:\n"
        "    return name.upper() if upper else name\n"
        "\n"
        "reveal_type(square)\n"
        "reveal_type(label)\n"
        'square("seven")\n'
        "label(3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(sample)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # By file name: mypy's cache replays a module's messages under the path it was first checked at.
    prefix = f"{sample.name}:"
    lines = [line.partition(prefix)[2] for line in proc.stdout.splitlines() if prefix in line]
    assert lines == [
        '11: note: Revealed type is "airflow.sdk.bases.decorator.Task[[x: int], int]"',
        '12: note: Revealed type is "airflow.sdk.bases.decorator.Task[[name: str, *, upper: bool =], str]"',
        '13: error: Argument 1 has incompatible type "str"; expected "int"  [arg-type]',
        '14: error: Argument 1 has incompatible type "int"; expected "str"  [arg-type]',
    ], proc.stdout + proc.stderr


def test_package_is_marked_typed():
    assert (PACKAGE / "py.typed").is_file()


#: Every public name and its stability. Moving a name to another level is a decision: make it here.
PUBLIC_API = {
    "airflow_ray.ray_task": "stable",
    "airflow_ray.hooks.RayHook": "stable",
    "airflow_ray.hooks.RayJobHook": "beta",
    "airflow_ray.operators.RaySubmitJobOperator": "beta",
    "airflow_ray.operators.RayServeDeployOperator": "alpha",
    "airflow_ray.operators.RayServeDeleteOperator": "alpha",
    "airflow_ray.triggers.RayJobTrigger": "beta",
    "airflow_ray.links.RayDashboardLink": "beta",
    "airflow_ray.exceptions.RayConnectionError": "stable",
    "airflow_ray.exceptions.RayAuthenticationError": "stable",
    "airflow_ray.exceptions.RayVersionMismatchError": "beta",
    "airflow_ray.exceptions.InfeasibleResourcesError": "stable",
    "airflow_ray.exceptions.RaySerializationError": "stable",
    "airflow_ray.exceptions.RayTaskFailedError": "stable",
    "airflow_ray.exceptions.RayObjectLostError": "stable",
    "airflow_ray.cli.main": "stable",
    "airflow_ray.xcom.RayXComBackend": "stable",
    "airflow_ray.operators.RayPythonOperator": "beta",
    "airflow_ray.assets.CheckpointAsset": "beta",
    "airflow_ray.openlineage_facets.RayRunFacet": "alpha",
    **{
        f"airflow_ray.checkpoint.{name}": "beta"
        for name in (
            "CheckpointLocation",
            "CheckpointError",
            "CheckpointCorruptError",
            "CheckpointMismatchError",
            "CheckpointNotFoundError",
            "CheckpointBaseError",
            "checkpoint_uri",
            "claim_base",
            "check_base",
            "write_checkpoint",
            "read_checkpoint",
            "read_manifest",
            "delete_checkpoint",
            "delete_run_checkpoints",
            "list_run_checkpoints",
            "resolve_checkpoint_location",
        )
    },
}


@pytest.mark.parametrize(
    "path, stability",
    list(PUBLIC_API.items()),
)
def test_public_names_carry_their_stability_mark(path, stability):
    module, _, name = path.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    assert vars(obj).get("__stability__") == stability  # its own mark, not a base class's
    assert obj.__doc__.rstrip().endswith(")."), "the mark's line ends the docstring"
    assert f"Stability: {stability} (" in obj.__doc__


@pytest.fixture
def configure(monkeypatch):
    """``configure({option: value})``: exactly these ``[ray]`` options are set (in the environment,
    which wins over airflow.cfg), the others unset; the option caches are cleared each time."""
    from airflow_ray import config

    def configure(values: dict[str, str]) -> None:
        for option in config.OPTIONS:
            variable = f"AIRFLOW__{config.SECTION.upper()}__{option.upper()}"
            if option in values:
                monkeypatch.setenv(variable, values[option])
            else:
                monkeypatch.delenv(variable, raising=False)
        config.clear_caches()

    yield configure
    monkeypatch.undo()
    config.clear_caches()  # the session's settings again, for the tests that follow


def _read_options() -> dict[str, object]:
    from airflow_ray import config

    return {option: getattr(config, option)() for option in config.OPTIONS}


def test_config_defaults_are_declared_once(configure):
    """Unset or empty, every option reads as its declared default: no accessor has its own."""
    from airflow_ray import config

    configure({})
    unset = _read_options()
    configure(dict.fromkeys(config.OPTIONS, " "))
    assert (
        unset
        == _read_options()
        == {
            "xcom_threshold_bytes": 65536,
            "xcom_conn_id": "ray_default",
            "object_ttl_seconds": 86400,
            "deployment_id": None,
            "max_objects": 100_000,
            "owner_shards": 1,
            "namespace": "airflow_ray",
            "infeasible_task_timeout": 60.0,
            "http_timeout_seconds": 60.0,
            "storage_timeout_seconds": 60.0,
            "checkpoint_path": None,
            "checkpoint_conn_id": None,
            "checkpoint_allow_pickle": True,
            "checkpoint_retention_seconds": 604800,
            "gc_grace_seconds": 600,
            "preload_in_scheduler": True,
            "local_cluster_dir": Path("~/.airflow_ray").expanduser(),
            "local_cluster_num_cpus": None,
            "local_cluster_object_store_bytes": None,
            "local_cluster_dashboard": False,
            "local_cluster_log_monitor": True,
            "local_cluster_keeper": True,
            "keeper_on_first_use": True,
        }
    )


def test_config_clear_caches_reaches_every_accessor(configure):
    from airflow_ray import config

    configure({})
    defaults = _read_options()
    configure(
        {
            option: {"integer": "7", "string": "other"}.get(spec["type"], str(spec["default"] != "True"))
            for option, spec in config.OPTIONS.items()
        }
    )
    changed = _read_options()
    assert [option for option in config.OPTIONS if changed[option] == defaults[option]] == []


# --- reading the package's source --------------------------------------------------------------


class _Source(NamedTuple):
    name: str
    tree: ast.Module
    is_package: bool


def _parse_package() -> dict[str, _Source]:
    sources = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = _Source(name, _parse(path), is_package)
    return sources


def _parse(path: Path) -> ast.Module:
    """``ast.parse``, once more when another thread's parse raced CPython 3.11's shared AST
    recursion counter ("AST constructor recursion depth mismatch", CPython gh-106905, fixed in
    later releases): the test process hosts Ray's and Airflow's threads, and CI met it once."""
    with contextlib.suppress(SystemError):
        return ast.parse(path.read_text(), str(path))
    return ast.parse(path.read_text(), str(path))


def _imports(source: _Source) -> list[tuple[str, str | None]]:
    """(imported module or name, the local name it is bound to) of every import, at any depth."""
    found: list[tuple[str, str | None]] = []
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, alias.asname))
                if alias.asname is None:  # `import a.b` binds `a`
                    top = alias.name.partition(".")[0]
                    found.append((top, top))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = source.name.split(".")
                anchor = parts[: len(parts) - node.level + source.is_package]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, None))
            found.extend((f"{base}.{alias.name}", alias.asname or alias.name) for alias in node.names)
    return found


def _is_private_ray(name: str) -> bool:
    if name.startswith(PRIVATE_RAY_MODULES):
        return True
    parts = name.split(".")
    return parts[0] == "ray" and any(_is_private(part) for part in parts[1:])


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_ray_names(source: _Source, own_names: set[str]) -> set[str]:
    """Private Ray names a module uses: the full dotted name of every use of a private Ray module
    (``ray._raylet.Config.initialize``), plus ``?._attr`` for underscore attributes that
    airflow_ray does not define itself (``handle._actor_id``), i.e. another library's private.
    Dunder names (``__ray_call__``, a developer API) are public."""
    imports = _imports(source)
    aliases = {alias: name for name, alias in imports if alias is not None}
    used = {name for name, _ in imports if _is_private_ray(name)}
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Attribute):
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.insert(0, root.attr)
                root = root.value
            if isinstance(root, ast.Name) and root.id in aliases:
                full = ".".join([aliases[root.id], *chain])
                if _is_private_ray(full):
                    used.add(full)
            elif _is_private(node.attr) and node.attr not in own_names:
                used.add(f"?.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in aliases and _is_private_ray(aliases[node.id]):
            used.add(aliases[node.id])
    return {name for name in used if not any(other.startswith(f"{name}.") for other in used)}


def _names_defined_in(sources) -> set[str]:
    """Every name airflow_ray binds anywhere: its underscore attributes are its own business."""
    names = set()
    for source in sources:
        for node in ast.walk(source.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name | ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return names


def _import_graph(modules: dict[str, _Source]) -> dict[str, set[str]]:
    """module -> the package's modules it imports. Importing one's own parent package does not
    count: it is imported before the module anyway, so it cannot close a cycle of its own making."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, source in modules.items():
        for imported, _ in _imports(source):
            target = imported
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(f"{target}."):
                graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = {stack.pop()}
            while node not in component:
                component.add(stack.pop())
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _describe_cycle(graph: dict[str, set[str]], component: set[str]) -> str:
    """One concrete cycle through the component, e.g. ``a -> b -> a``, by breadth-first search."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for successor in sorted(graph[node] & component):
            if successor == start:
                return " -> ".join([*paths[node], start]) + f"  (modules in the cycle: {sorted(component)})"
            if successor not in paths:
                paths[successor] = [*paths[node], successor]
                queue.append(successor)
    raise AssertionError(f"no cycle through {component}")


@pytest.mark.parametrize(
    "module, name",
    [
        pytest.param("airflow_ray.exceptions", "RayTaskError", id="renamed-class"),
        pytest.param("airflow_ray.errors", "RayTaskFailedError", id="renamed-module"),
    ],
)
def test_renamed_exceptions_keep_deprecated_aliases(module, name):
    """``RayTaskError`` shadowed Ray's own exception, ``errors`` is ``exceptions`` in providers."""
    from airflow_ray.exceptions import RayTaskFailedError

    with pytest.warns(DeprecationWarning, match="RayTaskFailedError|airflow_ray.exceptions"):
        alias = getattr(importlib.import_module(module), name)
    assert alias is RayTaskFailedError
