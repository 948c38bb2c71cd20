"""Version skew between the Airflow host and the cluster fails at connect time, in one message.

The cluster here is a real head of another Ray release (:data:`OTHER_RAY`), started from a second
virtualenv kept under ``~/.cache/airflow-ray-tests`` (built once: ~2 s with uv's cache, and a
~70 MB download without it), on loopback with token auth and a Ray Client server. The Airflow
side is this suite's virtualenv. A second Python minor cannot be installed here, so the Ray Client
Python-minor rule is checked on the versions a server would report (``test_python_minor_rule``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import ray

from airflow_ray import cluster, versions
from airflow_ray.exceptions import RayVersionMismatchError
from airflow_ray.hooks import RayHook
from tests.helpers import kill_cluster, script_report

ROOT = Path(__file__).resolve().parents[1]
#: A Ray release other than this suite's that installs on its Python and has token auth (2.52+).
OTHER_RAY = "2.52.1"
#: Cached across runs and checkouts, per base interpreter: the expected messages name this
#: Python's version for both sides, so a cache built from another Python (a pyenv one and the
#: system's, say) must not be reused.
_BASE_PYTHON = f"py{platform.python_version()}-{hashlib.sha256(sys.base_prefix.encode()).hexdigest()[:8]}"
VENV = Path.home() / ".cache" / "airflow-ray-tests" / f"ray-{OTHER_RAY}-{_BASE_PYTHON}"


def _other_ray_venv() -> Path:
    """The cached virtualenv with Ray :data:`OTHER_RAY` (and its Ray Client server), built if missing."""
    python = VENV / "bin" / "python"
    ready = VENV / ".complete"
    if ready.exists():
        return python
    shutil.rmtree(VENV, ignore_errors=True)
    uv = [sys.executable, "-m", "uv"]
    made = subprocess.run([*uv, "venv", "-q", "-p", sys.base_prefix + "/bin/python3", str(VENV)], check=False)
    install = [*uv, "pip", "install", "-q", "-p", str(python), f"ray[client]=={OTHER_RAY}"]
    if made.returncode or subprocess.run(install, check=False).returncode:
        pytest.skip(f"could not build a virtualenv with ray=={OTHER_RAY} (no package index reachable?)")
    ready.touch()
    return python


@pytest.fixture(scope="module")
def skewed_cluster():
    """``ray start --head`` of Ray :data:`OTHER_RAY`; yields its GCS and Ray Client addresses."""
    from tests.s3_server import _free_port

    python = _other_ray_venv()
    token = cluster.ensure_token().read_text().strip()
    temp_dir = tempfile.mkdtemp(prefix="arv-", dir="/tmp")  # short: Ray's socket paths
    port, client_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = [
        str(python.parent / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--ray-client-server-port={client_port}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--num-cpus=1",
        "--include-dashboard=false",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    env.update(cluster.LOCAL_ENV, PYTHONPATH="")
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=180, cwd=temp_dir)
    try:
        yield {"address": f"127.0.0.1:{port}", "client": f"ray://127.0.0.1:{client_port}", "token": token}
    finally:
        kill_cluster(temp_dir, f"127.0.0.1:{port}")  # never `ray stop`: it kills every cluster
        shutil.rmtree(temp_dir, ignore_errors=True)


def _expected_message(address: str, conn_id: str) -> str:
    here = os.path.dirname(ray.__file__)
    return (
        f"Ray version mismatch: this Airflow host has Ray {ray.__version__} ({here}) "
        f"on Python {platform.python_version()} ({sys.executable}), the cluster at {address} "
        f"(from Airflow connection '{conn_id}') runs Ray {OTHER_RAY} on Python {platform.python_version()}"
    )


def _subprocess_env(**conns: dict) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIRFLOW_CONN_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the cluster listens on loopback only
    env.update(
        {f"AIRFLOW_CONN_{name.upper()}": json.dumps({"conn_type": "ray", **c}) for name, c in conns.items()}
    )
    return env


def test_driver_address_fails_before_ray_init_naming_both_versions(skewed_cluster, monkeypatch):
    address = skewed_cluster["address"]
    monkeypatch.setenv("AIRFLOW_CONN_RAY_SKEWED", json.dumps({"conn_type": "ray", "host": address}))
    hook = RayHook("ray_skewed")
    ok, message = hook.test_connection()
    assert not ok
    assert message.startswith(_expected_message(address, "ray_skewed") + " (recorded by its head).")
    assert f"install ray=={OTHER_RAY} on this host (or run Ray {ray.__version__} on the cluster)" in message
    with pytest.raises(RayVersionMismatchError) as info:
        hook.connect()
    assert str(info.value) == message


def test_ray_client_fails_on_connecting_naming_both_versions(skewed_cluster):
    """A fresh process (a Ray Client session replaces any driver connection of the caller)."""
    conn = {"host": skewed_cluster["client"], "password": skewed_cluster["token"]}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "connect.py")],
        env=_subprocess_env(ray_default=conn),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = script_report(proc, "CONNECT")
    assert report["connect"].startswith(
        f"RayVersionMismatchError: {_expected_message(skewed_cluster['client'], 'ray_default')} "
        "(reported by its Ray Client server). Ray Client needs the same Ray version"
    )
    assert "Version mismatch: The cluster was started with" not in proc.stdout + proc.stderr  # Ray's own
    assert "Failed to connect" not in report["connect"]


def test_doctor_reports_the_skew(skewed_cluster):
    proc = subprocess.run(
        [sys.executable, "-m", "airflow_ray.cli", "doctor", "--connection", "ray_skewed"],
        env=_subprocess_env(ray_skewed={"host": skewed_cluster["address"]}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = {line.split()[1]: line for line in proc.stdout.splitlines() if line.split()}
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert lines["token"].startswith("ok")
    assert lines["versions"].startswith("FAILED")
    assert _expected_message(skewed_cluster["address"], "ray_skewed") in lines["versions"]
    assert lines["connect"].split()[0] == "skipped"


@pytest.mark.parametrize(
    "python, client, matches",
    [
        pytest.param("3.99.0", True, False, id="client-other-minor"),
        pytest.param("3.99.0", False, False, id="driver-other-minor"),
        pytest.param(f"{platform.python_version()}9", False, False, id="driver-other-patch"),
        pytest.param(f"{platform.python_version()}9", True, True, id="client-other-patch"),
    ],
)
def test_python_rule(python, client, matches):
    """Ray's rule (checked by Ray's own function): a Ray Client needs the Python minor, a driver the patch."""
    reported = {"ray_version": ray.__version__, "python_version": python}
    label = "ray://head:10001 (from Airflow connection 'ray_default')"
    if matches:
        versions.check(reported, label=label, client=client)
        return
    with pytest.raises(RayVersionMismatchError) as info:
        versions.check(reported, label=label, client=client)
    assert f"runs Ray {ray.__version__} on Python {python}." in str(info.value)
    assert f"run this host's Airflow on Python {python}" in str(info.value)
    assert "install ray==" not in str(info.value)  # the Ray versions match
