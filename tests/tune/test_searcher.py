"""The sweep's searcher on a real Optuna study (SQLite): trials that failed for infrastructure
reasons are recorded with the reason, run again with the same parameters and not counted
against the budget; the saved searcher state holds no storage password."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from ray.tune.search import Searcher

from mvtcae.tune_study import RecordingOptunaSearch, open_storage
from mvtcae.tune_trial import FAILURE_KEY, FAILURE_KIND_KEY, INFRASTRUCTURE

SECRET = "s3cr3t-optuna-pw"
METRIC = "val/joint_nll"


def _searcher(tmp_path: Path, budget: int) -> tuple[RecordingOptunaSearch, str]:
    url = f"sqlite:///{tmp_path / 'optuna.db'}?password={SECRET}"  # sqlite ignores it
    storage = open_storage(url)
    searcher = RecordingOptunaSearch(
        space={
            "model.alpha": FloatDistribution(0.0, 1.0),
            "model.beta": FloatDistribution(0.1, 10),
        },
        metric=METRIC,
        mode="min",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name="searcher-test",
        storage=storage,
        budget=budget,
    )
    return searcher, url


def _finish(searcher: RecordingOptunaSearch, trial_id: str, value: float) -> None:
    result = {METRIC: value, "training_iteration": 1}
    searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result)


def _infra_failure(searcher: RecordingOptunaSearch, trial_id: str) -> None:
    searcher.on_trial_result(
        trial_id,
        {FAILURE_KIND_KEY: INFRASTRUCTURE, FAILURE_KEY: "ConnectionError: MLflow unreachable",
         METRIC: math.nan, "training_iteration": 1},
    )  # fmt: skip
    searcher.on_trial_complete(trial_id, None, error=True)


def test_infrastructure_failures_are_rerun_outside_the_budget(tmp_path: Path):
    searcher, url = _searcher(tmp_path, budget=2)
    first = searcher.suggest("t1")
    _infra_failure(searcher, "t1")
    again = searcher.suggest("t2")
    assert again == first  # the same point, run again
    _finish(searcher, "t2", 3.0)
    searcher.suggest("t3")
    assert searcher.suggest("t4") is None  # budget met, but t3 may still fail for infra
    _finish(searcher, "t3", 2.0)
    assert searcher.suggest("t4") == Searcher.FINISHED

    trials = optuna.load_study(study_name="searcher-test", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert (
        trials[0].user_attrs["failure"] == f"{INFRASTRUCTURE}: ConnectionError: MLflow unreachable"
    )
    assert trials[1].params == trials[0].params


def test_a_trial_that_raised_for_its_parameters_counts_against_the_budget(tmp_path: Path):
    searcher, _ = _searcher(tmp_path, budget=1)
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", None, error=True)
    assert searcher.suggest("t2") == Searcher.FINISHED


def test_saved_searcher_state_holds_no_password_and_restores(tmp_path: Path):
    searcher, url = _searcher(tmp_path, budget=3)
    searcher.suggest("t1")
    _finish(searcher, "t1", 1.0)
    state = tmp_path / "searcher-state.pkl"
    searcher.save(str(state))
    assert SECRET.encode() not in state.read_bytes()

    open_storage(url)  # as a resumed sweep does before Tuner.restore
    restored = RecordingOptunaSearch(metric=METRIC, mode="min")
    restored.restore(str(state))
    assert restored.budget == 3
    assert restored.suggest("t2") is not None  # reattached to the study that holds t1
    trials = optuna.load_study(study_name="searcher-test", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING"]


def test_restoring_without_an_open_storage_says_so(tmp_path: Path):
    from mvtcae import tune_study

    searcher, _ = _searcher(tmp_path, budget=1)
    state = tmp_path / "state.pkl"
    searcher.save(str(state))
    tune_study._STORAGES.clear()
    with pytest.raises(RuntimeError, match="open_storage"):
        RecordingOptunaSearch(metric=METRIC, mode="min").restore(str(state))
