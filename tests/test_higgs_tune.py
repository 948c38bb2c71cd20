"""The HIGGS Tune tasks as plain functions on a real local Ray: trials get their configs, the best
model is loaded downstream, the learning-curve plot is written.

``tests/test_higgs_dags.py`` runs the same tasks as an Airflow DAG; this one needs no Airflow run,
so it pins down the data-science behaviour on its own.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from tests.helpers import connected_or_private_ray

DAGS = Path(__file__).resolve().parents[1] / "examples" / "dags"
sys.path.insert(0, str(DAGS))

import higgs_data  # noqa: E402
import higgs_training  # noqa: E402
import higgs_tune  # noqa: E402  (the DAG file: its tasks' .function are the plain functions)

MAX_ROUNDS = 30
REPORT_EVERY = 3


@pytest.fixture(scope="module")
def ray_cluster():
    """The Ray this process is already connected to (the suite's head), else a private 2-CPU one."""
    import ray

    # Ray workers cannot import the DAG-folder helpers: ship them by value, as @ray_task does.
    for module in (higgs_data, higgs_training, higgs_tune):
        ray.cloudpickle.register_pickle_by_value(module)
    yield from connected_or_private_ray()


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tune_storage")


@pytest.fixture(scope="module")
def data(ray_cluster):
    return higgs_tune.prepare_data.function(None, n_rows=12_000, seed=0)


@pytest.fixture(scope="module")
def tuned(data, storage):
    return higgs_tune.tune_xgboost.function(
        data["train"],
        num_samples=6,
        max_rounds=MAX_ROUNDS,
        report_every=REPORT_EVERY,
        seed=0,
        storage_path=storage.as_uri(),
    )


def _same_params(trained_with: dict[str, float], config: dict[str, float]) -> bool:
    # xgboost keeps float parameters as float32: compare at that precision.
    return set(trained_with) == set(config) and all(
        math.isclose(trained_with[name], config[name], rel_tol=1e-6) for name in config
    )


def test_each_trial_trained_with_its_sampled_config(tuned):
    trials = tuned["trials"]
    assert len(trials) == 6
    for trial in trials:
        # "trained_with" is read back from the booster inside the trial, not copied from the config.
        assert _same_params(trial["trained_with"], trial["config"]), trial
    # Six different samples, so a bug that trains every trial with one config would show.
    assert len({tuple(sorted(t["config"].items())) for t in trials}) == 6
    assert len({t["trained_with"]["eta"] for t in trials}) == 6


def test_asha_stops_weak_trials_early(tuned):
    rounds = [trial["rounds"] for trial in tuned["trials"]]
    assert all(r % REPORT_EVERY == 0 and r <= MAX_ROUNDS for r in rounds)
    assert min(rounds) < MAX_ROUNDS, f"ASHA stopped no trial: {rounds}"
    assert max(rounds) == MAX_ROUNDS


def test_best_is_the_best_trial_and_on_shared_storage(tuned, storage):
    best_loss = tuned["best_metrics"]["valid-logloss"]
    assert best_loss <= min(trial["valid-logloss"] for trial in tuned["trials"]) + 1e-12
    assert tuned["best_config"] in [trial["config"] for trial in tuned["trials"]]
    assert tuned["best_checkpoint"].startswith(storage.as_uri())
    assert tuned["experiment_uri"].startswith(storage.as_uri())


def test_downstream_loads_the_best_model(tuned, data):
    scored = higgs_tune.score_best_model.function(tuned, data["test"])

    assert scored["n_test"] == len(data["test"])
    assert _same_params(scored["trained_with"], tuned["best_config"])
    assert scored["rounds"] == tuned["best_metrics"]["rounds"]
    assert scored["accuracy"] > 0.62 and scored["auc"] > 0.68


def test_learning_curves_png(tuned):
    uri = higgs_tune.plot_learning_curves.function(tuned)

    path = Path(uri.removeprefix("file://"))
    assert uri.startswith(tuned["experiment_uri"]) and path.suffix == ".png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
