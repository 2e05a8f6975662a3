"""A real sweep of a few tiny trials: Optuna study in SQLite, MLflow parent/child runs, a forced
NaN trial and a forced raising trial, an interruption (SIGINT) and ``resume``, ASHA, and the best
model through the promotion gate. One Ray session and one sweep for the whole module."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from sweep_helpers import tiny_tune_file

from mvtcae.config import ConfigError
from mvtcae.data import load_manifest
from mvtcae.sweep.study import run_id_of

pytestmark = pytest.mark.slow

NAN_LR = 1e6  # outside the searched range: Adam diverges to NaN within an epoch
BAD_ALPHA = 1.5  # outside model.alpha's valid range: the trial raises before training


def _completed_trials(storage_url: str) -> int:
    """COMPLETE trials in the study's SQLite file, read-only (a reader through Optuna would
    create the schema, racing the sweep that is creating it)."""
    path = Path(storage_url.removeprefix("sqlite:///"))
    if not path.is_file():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            (count,) = db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()
    except sqlite3.Error:  # the schema is not there yet
        return 0
    return count


def _interrupt_after_first_complete(spec, stop: threading.Event) -> None:
    """SIGINT this process (as Ctrl+C would) once a trial is COMPLETE and others are pending."""
    while not stop.wait(0.1):  # trials in a reused process take seconds: look often
        if _completed_trials(spec.tune.storage):
            os.kill(os.getpid(), signal.SIGINT)
            return


@pytest.fixture(scope="module")
def sweep(platform_ray, tiny_dataset, tmp_path_factory):
    """Run a 4-trial sweep (two forced failures), interrupt it, resume it: (spec, first, final)."""
    from mvtcae.config import load_sweep_config
    from mvtcae.sweep import run_sweep

    root = tmp_path_factory.mktemp("sweep")
    tune = {
        "study_name": "tiny-sweep",
        "num_samples": 4,
        "max_concurrent": 1,  # sequential, so a trial is still pending when the first completes
        "seed": 7,
        "space": {
            "model.alpha": {"type": "uniform", "low": 0.0, "high": 1.0},
            "model.beta": {"type": "loguniform", "low": 0.1, "high": 10.0},
            "train.optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
        },
        "points_to_evaluate": [
            {"model.alpha": 0.5, "model.beta": 1.0, "train.optimizer.lr": NAN_LR},
            {"model.alpha": BAD_ALPHA, "model.beta": 1.0, "train.optimizer.lr": 3e-3},
        ],
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
    }
    spec = load_sweep_config(tiny_tune_file(root, tiny_dataset, tune, epochs=2))
    stop = threading.Event()
    watcher = threading.Thread(target=_interrupt_after_first_complete, args=(spec, stop))
    watcher.start()
    try:
        first = run_sweep(spec)
    finally:
        stop.set()
        watcher.join()
    first_trials = _study(spec).get_trials()
    final = run_sweep(spec, resume=True)
    return spec, first, first_trials, final


def _study(spec):
    import optuna

    return optuna.load_study(study_name=spec.study_name, storage=spec.tune.storage)


def _client(spec):
    from mlflow import MlflowClient

    uri = spec.experiment.tracking.tracking_uri
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_interrupted_sweep_resumes_without_losing_finished_trials(sweep):
    import optuna

    spec, first, first_trials, final = sweep
    assert not first.finished and final.finished
    assert final.parent_run_id == first.parent_run_id
    done = {t.number: t for t in first_trials if t.state.is_finished()}
    assert 1 <= len(done) < 4
    after = {t.number: t for t in _study(spec).get_trials()}
    for number, trial in done.items():
        assert after[number].state == trial.state and after[number].values == trial.values
        assert after[number].params == trial.params
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in after.values())


def test_study_holds_every_trial_and_failures_are_failed(sweep):
    import optuna

    spec, _, _, final = sweep
    study = _study(spec)
    trials = study.get_trials()
    assert len(trials) == 4
    by_lr = {t.params["train.optimizer.lr"]: t for t in trials}
    assert by_lr[NAN_LR].state == optuna.trial.TrialState.FAIL
    bad = [t for t in trials if t.params["model.alpha"] == BAD_ALPHA]
    assert len(bad) == 1 and bad[0].state == optuna.trial.TrialState.FAIL
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2
    assert all(math.isfinite(t.value) and t.value > 0 for t in complete)  # an NLL, not a loss
    assert all(run_id_of(study, t) for t in complete)
    assert [row["number"] for row in final.trials] == [t.number for t in trials]


def test_mlflow_parent_and_child_runs(sweep):
    spec, _, _, final = sweep
    client = _client(spec)
    parent = client.get_run(final.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.num_samples"] == "4"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{final.parent_run_id}'",
    )
    statuses = sorted(c.info.status for c in children)
    # a trial cut by the interruption (if one was running) went on in the run it had: no
    # run is left KILLED, and its history below is complete
    assert [s for s in statuses if s != "KILLED"] == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert statuses.count("KILLED") == 0
    failed = [c for c in children if c.info.status == "FAILED"]
    errors = " ".join(c.data.tags["mvtcae.tune.error"] for c in failed)
    assert "TrialDiverged" in errors and "model.alpha" in errors
    for child in children:
        if child.info.status != "FINISHED":
            continue
        sampled = json.loads(
            Path(client.download_artifacts(child.info.run_id, "trial_params.json")).read_text()
        )
        assert float(child.data.params["model.alpha"]) == pytest.approx(sampled["model.alpha"])
        history = client.get_metric_history(child.info.run_id, "val/joint_nll")
        assert [m.step for m in history] == [1, 2]
        (used,) = client.get_run(child.info.run_id).inputs.dataset_inputs  # its lineage
        assert used.dataset.digest == load_manifest(spec.experiment.data.dir).digest()
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) == 2
        assert "eval/joint_nll" in child.data.metrics
        # One worker: the trial trained in its own process (tune.trials_in_process auto).
        assert child.data.tags["mvtcae.train.host"] == "in process"
        # Its worker's log (Ray's and MLflow's INFO lines, off the console) is in its run.
        logs = {a.path for a in client.list_artifacts(child.info.run_id, "logs")}
        assert "logs/rank0.log" in logs, logs
    logs = {a.path for a in client.list_artifacts(final.parent_run_id, "logs")}
    assert "logs/driver.log" in logs, logs
    artifacts = {a.path for a in client.list_artifacts(final.parent_run_id, "study")}
    assert {"study/optimization_history.png", "study/trials.json"} <= artifacts
    assert "study/contour_alpha_beta.png" in artifacts


def test_best_model_registered_through_the_gate(sweep):
    spec, _, _, final = sweep
    client = _client(spec)
    assert final.best is not None and final.registered is not None
    name = spec.experiment.tracking.registered_model_name
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.run_id == final.best["mlflow_run_id"]
    assert champion.tags["promotion.metric"] == "eval/joint_nll"
    assert (
        champion.tags["mvtcae.dataset.digest"] == load_manifest(spec.experiment.data.dir).digest()
    )
    assert final.best["number"] == _study(spec).best_trial.number


def test_existing_sweep_is_not_started_over(sweep):
    from mvtcae.sweep import run_sweep

    spec = sweep[0]
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(spec)


def test_a_diverged_trial_fails_at_the_epoch_it_diverged(sweep):
    import optuna

    spec, _, _, final = sweep
    client = _client(spec)
    parent = client.get_run(final.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{final.parent_run_id}'",
    )
    (diverged,) = [
        c
        for c in children
        if float(c.data.params.get("train.optimizer.lr", "0")) == NAN_LR
        and c.info.status == "FAILED"
    ]
    error = diverged.data.tags["mvtcae.tune.error"]
    assert "TrialDiverged" in error and "non-finite values at epoch 1, step" in error
    assert "epoch 1, step" in diverged.data.tags["mvtcae.nonfinite"]
    # Stopped inside epoch 1: no epoch was completed, evaluated or checkpointed.
    assert client.get_metric_history(diverged.info.run_id, "train/loss") == []
    assert client.get_metric_history(diverged.info.run_id, "val/joint_nll") == []
    (trial,) = [t for t in _study(spec).get_trials() if t.params["train.optimizer.lr"] == NAN_LR]
    assert trial.state == optuna.trial.TrialState.FAIL
    assert not trial.intermediate_values
