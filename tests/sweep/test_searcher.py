"""The sweep's searcher on a real Optuna study (SQLite), through its public ask-and-tell API:
failures are told as FAIL with their reason; trials that failed for infrastructure reasons run
again with the same parameters and do not count against the budget; the searcher pickles (as
Tune keeps it) and saves its state without the storage's password, and reattaches to the study;
two objectives give a Pareto front and plots."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import FloatDistribution
from ray.tune.search import Searcher

from mvtcae.config import load_sweep_config
from mvtcae.sweep import study as sweep_study
from mvtcae.sweep.study import StudySearcher, build_searcher, open_storage
from mvtcae.sweep.trial import FAILURE_KEY, FAILURE_KIND_KEY, INFRASTRUCTURE

SECRET = "s3cr3t-optuna-pw"
METRIC = "val/joint_nll"
REPO = Path(__file__).resolve().parents[2]


def _searcher(tmp_path: Path, budget: int) -> tuple[StudySearcher, str]:
    url = f"sqlite:///{tmp_path / 'optuna.db'}?password={SECRET}"  # sqlite ignores it
    searcher = StudySearcher(
        {"model.alpha": FloatDistribution(0.0, 1.0), "model.beta": FloatDistribution(0.1, 10)},
        [METRIC],
        ["min"],
        study_name="searcher-test",
        storage=open_storage(url),
        sampler=optuna.samplers.RandomSampler(seed=0),
        budget=budget,
    )
    return searcher, url


def _finish(searcher: StudySearcher, trial_id: str, value: float) -> None:
    result = {METRIC: value, "training_iteration": 1}
    searcher.on_trial_result(trial_id, result)
    searcher.on_trial_complete(trial_id, result)


def _infra_failure(searcher: StudySearcher, trial_id: str) -> None:
    searcher.on_trial_result(
        trial_id,
        {
            FAILURE_KIND_KEY: INFRASTRUCTURE,
            FAILURE_KEY: "ConnectionError: MLflow unreachable",
            METRIC: math.nan,
            "training_iteration": 1,
        },
    )
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
    expected = f"{INFRASTRUCTURE}: ConnectionError: MLflow unreachable"
    assert trials[0].user_attrs["failure"] == expected
    assert trials[1].params == trials[0].params
    assert trials[1].intermediate_values == {1: 3.0}  # reported to Optuna, as ASHA sees it


def test_a_trial_that_raised_for_its_parameters_counts_against_the_budget(tmp_path: Path):
    searcher, _ = _searcher(tmp_path, budget=1)
    searcher.suggest("t1")
    searcher.on_trial_complete("t1", None, error=True)
    assert searcher.suggest("t2") == Searcher.FINISHED


def test_the_searcher_pickles_and_saves_without_the_password_and_reattaches(tmp_path: Path):
    searcher, url = _searcher(tmp_path, budget=3)
    searcher.suggest("t1")
    _finish(searcher, "t1", 1.0)
    searcher.suggest("t2")  # still running when the sweep is interrupted
    pickled = pickle.dumps(searcher)  # what Tune keeps in its experiment state
    assert SECRET.encode() not in pickled
    state = tmp_path / "searcher-state.json"
    searcher.save(str(state))
    assert SECRET not in state.read_text()

    open_storage(url)  # a resumed sweep opens its storage before Tune restores the searcher
    restored = pickle.loads(pickled)
    restored.restore(str(state))
    assert restored.budget == 3 and restored.numbers == {"t1": 0, "t2": 1}
    # t2 finishes after the restore: told by number, as no live Optuna trial object remains.
    restored.on_trial_complete("t2", {METRIC: 0.5, "mlflow_run_id": "run-t2"})
    study = optuna.load_study(study_name="searcher-test", storage=url)
    trials = study.get_trials()
    assert [(t.state.name, t.value) for t in trials] == [("COMPLETE", 1.0), ("COMPLETE", 0.5)]
    # ... and still linked to its MLflow run.
    assert sweep_study.run_id_of(study, trials[1]) == "run-t2"
    assert sweep_study.trial_rows(study)[1]["mlflow_run_id"] == "run-t2"


def test_restoring_without_an_open_storage_says_so(tmp_path: Path):
    searcher, _ = _searcher(tmp_path, budget=1)
    pickled = pickle.dumps(searcher)
    sweep_study._STORAGES.clear()
    with pytest.raises(RuntimeError, match="open_storage"):
        pickle.loads(pickled).suggest("t9")


def test_orphans_of_an_interrupted_sweep_are_failed_with_a_reason(tmp_path: Path):
    searcher, url = _searcher(tmp_path, budget=2)
    searcher.suggest("t1")
    study = optuna.load_study(study_name="searcher-test", storage=url)
    assert sweep_study.fail_orphans(study) == 1
    (trial,) = study.get_trials()
    assert trial.state.name == "FAIL"
    assert sweep_study.trial_rows(study)[0]["failure"] == "left running by an interrupted sweep"


def _write(tmp_path: Path, tune: dict) -> Path:
    path = tmp_path / "tune.yaml"
    body = {"base": str(REPO / "jobs" / "configs" / "demo.yaml"), "tune": tune}
    path.write_text(yaml.safe_dump(body))
    return path


def _spec_searcher(tmp_path: Path, objectives: list[dict]):
    path = _write(tmp_path, {"objectives": objectives, "storage": f"sqlite:///{tmp_path}/o.db"})
    spec = load_sweep_config(path)
    return spec, build_searcher(spec, open_storage(spec.tune.storage))


def test_searcher_records_errors_and_nan_as_failed(tmp_path):
    spec, searcher = _spec_searcher(tmp_path, [{"metric": "val/joint_nll", "mode": "min"}])
    for trial_id in ("a", "b", "c", "d"):
        params = searcher.suggest(trial_id)
        assert 0.0 <= params["model.alpha"] <= 1.0 and 0.1 <= params["model.beta"] <= 10.0
    searcher.on_trial_complete("a", {"val/joint_nll": 12.5, "mlflow_run_id": "run-a"})
    searcher.on_trial_complete("b", {"val/joint_nll": math.nan})
    searcher.on_trial_complete("c", {"val/joint_nll": 9.0}, error=True)  # stale value, then raised
    searcher.on_trial_complete("d", None, error=True)
    study = optuna.load_study(study_name=spec.study_name, storage=spec.tune.storage)
    states = [t.state.name for t in study.get_trials()]
    assert states == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    assert study.best_trial.user_attrs == {"tune_trial_id": "a", "mlflow_run_id": "run-a"}
    assert "not finite" in study.get_trials()[1].user_attrs["failure"]


def test_two_objectives_give_a_pareto_front_and_plots(tmp_path):
    objectives = [
        {"metric": "val/joint_nll", "mode": "min"},
        {"metric": "val/coherence_1", "mode": "max"},
    ]
    spec, searcher = _spec_searcher(tmp_path, objectives)
    results = {"a": (10.0, 0.5), "b": (12.0, 0.8), "c": (11.0, 0.4), "d": (9.0, 0.3)}
    for trial_id, (nll, coherence) in results.items():
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"val/joint_nll": nll, "val/coherence_1": coherence})
    study = optuna.load_study(study_name=spec.study_name, storage=spec.tune.storage)
    front = {tuple(row["values"]) for row in sweep_study.pareto_front(study)}
    assert front == {(10.0, 0.5), (12.0, 0.8), (9.0, 0.3)}  # c is dominated by a
    assert sweep_study.best_row(study, spec.tune.modes)["values"] == [9.0, 0.3]
    plots = sweep_study.save_study_plots(study, spec.tune.metrics, tmp_path / "plots")
    assert {"optimization_history", "contour_alpha_beta", "pareto_front"} <= set(plots)
    assert all(p.stat().st_size > 1000 for p in plots.values())
