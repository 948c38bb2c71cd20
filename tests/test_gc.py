"""``airflow-ray gc`` while tasks run: it frees only what it can prove is garbage (issue 13, item 4).

Real parts: DAG runs with ``dag.test()`` against the session's Ray head, their rows in the real
metadata DB (edited here as a deleted run, a cleared XCom or a running task instance leaves
them), real checkpoint directories. The sweep under a real scheduler, while runs execute, is in
tests/test_local_executor.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from airflow_ray import checkpoint, deployment, retention
from airflow_ray.checkpoint import BASE_MARKER, CheckpointBaseError, CheckpointLocation, checkpoint_uri
from airflow_ray.owners import get_owner, owner_name
from tests.dags import checkpointed, handoff
from tests.helpers import script_report

# --- objects -------------------------------------------------------------------------------------


@pytest.fixture
def orphan(run_dag):
    """A finished run's kept output whose XCom row is gone (as clearing the XCom leaves it):
    ``(result, object_id, owner)``."""
    result = run_dag(handoff.isolation_dag, run_conf={"value": 7})
    assert result.state == "success", result.states
    produced = result.xcom_raw("produce")["object_id"]
    _delete_rows(result, "produce")
    return result, produced, get_owner(owner_name(result.dag_id, result.run_id))


def test_gc_keeps_an_entry_younger_than_the_grace_period(orphan):
    _, produced, owner = orphan
    assert retention.collect(grace_seconds=600)["freed"] == 0  # its XCom row may not be written yet
    assert produced in _held(owner)
    retention.collect(grace_seconds=0)
    assert produced not in _held(owner)


def test_gc_keeps_the_outputs_of_an_unfinished_task_instance(orphan):
    from airflow.utils.state import TaskInstanceState

    result, produced, owner = orphan
    _set_state(result, "produce", TaskInstanceState.RUNNING)  # e.g. a retry still pushing its outputs
    assert retention.collect(grace_seconds=0)["freed"] == 0
    assert produced in _held(owner)
    _set_state(result, "produce", TaskInstanceState.SUCCESS)
    assert retention.collect(grace_seconds=0)["freed"] >= 1
    assert produced not in _held(owner)


def test_gc_lists_the_owners_before_it_reads_the_xcom_rows(run_dag, monkeypatch):
    """A row written while gc runs (after the owners were listed) is in the DB snapshot it judges
    by: the owners are listed first. Read first, the snapshot would lack it and free its object."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    result = run_dag(handoff.isolation_dag, run_conf={"value": 8})
    produced = result.xcom_raw("produce")["object_id"]
    with create_session() as session:
        row = (
            session.query(XComModel)
            .filter_by(dag_id=result.dag_id, run_id=result.run_id, task_id="produce", key="return_value")
            .one()
        )
        columns = {c.name: getattr(row, c.name) for c in XComModel.__table__.columns}
    _delete_rows(result, "produce")
    list_owners = retention.running_owner_names

    def list_then_write_the_row(*args):
        names = list_owners(*args)
        with create_session() as session:
            session.add(XComModel(**columns))
        return names

    monkeypatch.setattr(retention, "running_owner_names", list_then_write_the_row)
    retention.collect(grace_seconds=0)
    assert produced in _held(get_owner(owner_name(result.dag_id, result.run_id)))


def test_gc_in_a_process_that_is_no_driver_yet_sweeps_the_xcom_cluster(orphan, tmp_path):
    """Ray answers a call made before ``ray.init`` from a new, empty local cluster: gc must connect
    to the XCom backend's cluster first, or it would find no owners and report nothing freed."""
    _, produced, owner = orphan
    code = "from airflow_ray import retention; print('GC=' + json.dumps(retention.collect(grace_seconds=0)))"
    proc = subprocess.run(
        [sys.executable, "-c", f"import json; {code}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert script_report(proc, "GC")["freed"] >= 1
    assert produced not in _held(owner)


def test_gc_goes_on_past_an_owner_it_cannot_ask(orphan, monkeypatch):
    _, produced, owner = orphan
    names = retention.running_owner_names
    gone = "airflow_ray_owner-v0-00000000-gone-0"  # listed, then died before it was asked
    monkeypatch.setattr(retention, "running_owner_names", lambda *args: [gone, *names(*args)])
    counts = retention.collect(grace_seconds=0)
    assert counts["failed"] == 1 and counts["freed"] >= 1
    assert produced not in _held(owner)


# --- checkpoints ---------------------------------------------------------------------------------


@pytest.fixture
def checkpointed_run(run_dag, tmp_path):
    """A finished run of ``checkpointed`` under ``tmp_path``: ``(result, base, run directory)``."""
    base = f"file://{tmp_path}"
    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": base})
    assert result.state == "success", result.states
    return result, base, next((tmp_path / "checkpointed").iterdir())


def test_the_first_checkpoint_write_marks_the_base_as_this_deployments(checkpointed_run, tmp_path):
    marker = json.loads((tmp_path / BASE_MARKER).read_text())
    assert marker["deployment"] == deployment.current().id
    assert checkpoint.check_base(f"file://{tmp_path}", {}, deployment.current().id)


def test_a_checkpoint_write_under_another_deployments_base_is_refused(run_dag, tmp_path):
    (tmp_path / BASE_MARKER).write_text(json.dumps({"deployment": "staging"}))
    loc = CheckpointLocation(
        checkpoint_uri(tmp_path.as_uri(), dag_id="d", run_id="r", task_id="t"), base=tmp_path.as_uri()
    )
    with pytest.raises(CheckpointBaseError, match="belongs to the Airflow deployment 'staging'") as excinfo:
        checkpoint.write_checkpoint([1], loc, deployment="prod")
    assert "must not share a base" in str(excinfo.value) and "checkpoint_path" in str(excinfo.value)
    assert not (tmp_path / "d").exists()

    result = run_dag(checkpointed.checkpointed_dag, run_conf={"base": tmp_path.as_uri()})
    assert result.states["produce"] == "failed" and result.states["produce_plain"] == "failed"
    assert [p.name for p in tmp_path.iterdir()] == [BASE_MARKER]  # nothing written


def test_parallel_claims_of_a_fresh_base_never_see_a_torn_marker(tmp_path):
    """The writes of one task's outputs claim a fresh base at once (a truncated marker read by a
    second writer failed a CI run as "malformed"); of two deployments racing, exactly one wins."""
    from concurrent.futures import ThreadPoolExecutor

    def claim(base: str, deployment_id: str) -> str:
        try:
            checkpoint.claim_base(base, {}, deployment_id)
            return "claimed"
        except CheckpointBaseError as exc:
            return "malformed" if "malformed" in str(exc) else "refused"

    bases = [(tmp_path / f"b{n}").as_uri() for n in range(40)]
    same = [(base, "prod") for base in bases for _ in range(8)]
    racing = [(f"{base}-r", f"d{i % 2}") for base in bases for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(lambda job: claim(*job), same)) == {"claimed"}
        outcomes = dict(zip(racing, pool.map(lambda job: claim(*job), racing), strict=True))
    for base, deployment_id in racing:
        winner = json.loads((Path(base.removeprefix("file://")) / BASE_MARKER).read_text())["deployment"]
        assert outcomes[base, deployment_id] == ("claimed" if deployment_id == winner else "refused")
    assert sorted(p.name for p in (tmp_path / "b0").iterdir()) == [BASE_MARKER]  # no file left aside


@pytest.mark.parametrize(
    "marker, why",
    [
        pytest.param(None, f"it has no {BASE_MARKER}.*a mistyped base", id="mistyped-base"),
        pytest.param({"deployment": "staging"}, "belongs to the Airflow deployment 'staging'", id="foreign"),
        pytest.param("not json", "malformed", id="malformed"),
    ],
)
def test_gc_deletes_nothing_under_a_base_that_is_not_this_deployments(tmp_path, marker, why):
    old = tmp_path / "some_dag" / "deleted_run" / "t" / "-1"
    old.mkdir(parents=True)
    (old / "data.npy").write_bytes(b"precious")
    _age(tmp_path / "some_dag", days=30)
    if marker is not None:
        (tmp_path / BASE_MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    with pytest.raises(CheckpointBaseError, match=why):
        retention.expire_checkpoints(tmp_path.as_uri(), retention_seconds=3600, grace_seconds=0)
    assert (old / "data.npy").read_bytes() == b"precious"


def test_gc_of_a_base_that_holds_nothing_yet_deletes_nothing_and_does_not_fail(tmp_path):
    """A configured base before the deployment's first checkpoint: gc in cron must not fail."""
    nothing = {"kept": 0, "deleted": 0, "failed": 0}
    assert retention.expire_checkpoints((tmp_path / "not-yet").as_uri(), retention_seconds=1) == nothing
    assert retention.expire_checkpoints(tmp_path.as_uri(), retention_seconds=1) == nothing


def test_gc_cli_names_a_refused_base_and_exits_1(tmp_path, ray_cluster, capsys):
    from airflow_ray import cli

    (tmp_path / "some_dag" / "run").mkdir(parents=True)
    assert cli.main(["gc", "--dry-run", "--checkpoints", tmp_path.as_uri()]) == 1
    out, err = capsys.readouterr()
    assert "would free" in out
    assert f"Not expiring checkpoints under {tmp_path.as_uri()}: it has no {BASE_MARKER}" in err
    assert (tmp_path / "some_dag" / "run").exists()


def test_gc_judges_a_run_without_a_manifest_by_its_modification_time(checkpointed_run):
    _, base, run_dir = checkpointed_run
    for manifest in run_dir.rglob("manifest.json"):  # every checkpoint of the run is mid-write
        manifest.unlink()
    assert retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0)["kept"] == 1
    assert run_dir.exists()
    _age(run_dir, days=2)  # written long ago, never finished
    assert retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0)["deleted"] == 1
    assert not run_dir.exists()


def test_gc_keeps_young_checkpoints_of_a_run_it_does_not_know(checkpointed_run):
    """A run directory the DB has no run for is deleted only after the grace period."""
    _, base, run_dir = checkpointed_run
    unknown = run_dir.with_name("manual__not_in_the_db")
    shutil.copytree(run_dir, unknown, copy_function=shutil.copyfile)  # written now
    assert retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=600)["deleted"] == 0
    assert unknown.exists()
    assert retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0)["deleted"] == 1
    assert not unknown.exists() and run_dir.exists()


def test_gc_keeps_expired_checkpoints_of_an_unfinished_run(checkpointed_run):
    from airflow.utils.state import DagRunState

    result, base, run_dir = checkpointed_run
    later = time.time() + 30 * 86400
    _set_run_state(result, DagRunState.RUNNING)  # e.g. cleared, its tasks re-running
    assert retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0, now=later)["kept"] == 1
    _set_run_state(result, DagRunState.SUCCESS)
    assert (
        retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0, now=later)["deleted"] == 1
    )
    assert not run_dir.exists()


def test_one_bad_run_does_not_stop_the_sweep(checkpointed_run, caplog):
    _, base, run_dir = checkpointed_run
    bad, good = (run_dir.with_name(f"manual__deleted_{n}") for n in ("bad", "good"))
    for path in (bad, good):
        shutil.copytree(run_dir, path)
    with _undeletable(bad):
        counts = retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0)
    assert counts == {"kept": 1, "deleted": 1, "failed": 1}
    assert not good.exists() and bad.exists()
    assert f"airflow-ray gc skipped checkpoints {bad.as_uri()}/" in caplog.text
    assert retention.expire_checkpoints(base, retention_seconds=3600, grace_seconds=0)["deleted"] == 1


def test_list_run_checkpoints_reports_a_run_it_cannot_read_and_goes_on(tmp_path, monkeypatch):
    """Listing errors go to ``on_error`` (a store that refuses one directory; fsspec's local
    filesystem refuses nothing to root, so the refusal is this directory's listing)."""
    for run in ("r1", "r2"):
        (tmp_path / "d" / run / "t" / "-1").mkdir(parents=True)
    errors: list[str] = []
    fs, _ = checkpoint_fs(tmp_path)  # the instance fsspec caches, which the listing uses
    find = fs.find

    def refuse_r1(path, *args, **kwargs):
        if path.endswith("/r1"):
            raise PermissionError(f"access denied: {path}")
        return find(path, *args, **kwargs)

    monkeypatch.setattr(fs, "find", refuse_r1)
    runs = list(
        checkpoint.list_run_checkpoints(tmp_path.as_uri(), on_error=lambda uri, _: errors.append(uri))
    )
    assert [run.run for run in runs] == ["r2"]
    assert errors == [f"{tmp_path.as_uri()}/d/r1/"]


def test_marker_docstring_example_runs():
    import doctest

    from airflow_ray._worker.checkpoint import marker

    result = doctest.testmod(marker)
    assert result.attempted > 0 and result.failed == 0


# --- helpers -------------------------------------------------------------------------------------


def checkpoint_fs(path: Path):
    from airflow_ray._worker.checkpoint.filesystem import open_fs

    return open_fs(path.as_uri(), {})


def _held(owner) -> set[str]:
    return {e["object_id"] for e in ray.get(owner.entries.remote())}


def _delete_rows(result, task_id: str) -> None:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(XComModel).filter_by(
            dag_id=result.dag_id, run_id=result.run_id, task_id=task_id
        ).delete()


def _set_state(result, task_id: str, state) -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(TaskInstance).filter_by(
            dag_id=result.dag_id, run_id=result.run_id, task_id=task_id
        ).update({"state": state})


def _set_run_state(result, state) -> None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.query(DagRun).filter_by(dag_id=result.dag_id, run_id=result.run_id).update({"state": state})


def _age(root: Path, *, days: float) -> None:
    """Set the modification time of ``root`` and everything below it ``days`` back."""
    then = time.time() - days * 86400
    for path in [root, *root.rglob("*")]:
        os.utime(path, (then, then))


@contextlib.contextmanager
def _undeletable(path: Path):
    """Make ``path``'s contents undeletable: read-only for a normal user, immutable for root
    (``chattr +i``, where the filesystem has it)."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)]).returncode != 0:
        pytest.skip("root without chattr +i: nothing here makes a directory undeletable")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
