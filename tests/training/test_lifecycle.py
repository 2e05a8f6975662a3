"""The typed plan of the worker loop and the run lifecycle, without a worker group: the plan
survives pickling as Ray sends it, and a run is closed FAILED (its error redacted in its tag)
when training raises, KILLED on an interrupt, and left open when Tune stops a trial. Real MLflow
(SQLite in tmp_path) and the in-process host on the tiny dataset: seconds, not minutes."""

from __future__ import annotations

import pickle
import signal
from pathlib import Path

import pytest
import ray.cloudpickle

from mvtcae.data import load_manifest
from mvtcae.model.errors import Interrupted
from mvtcae.tracking.run_logger import RunLogger, mlflow_client
from mvtcae.training import EpochObjectives, model_config_for
from mvtcae.training.lifecycle import TrackedRun, closing, fit, open_run
from mvtcae.training.plan import PLAN_KEY, FitPlan, ImageGrids, LoopPlan


def _plan(cfg, dataset: Path, run_dir: Path, **extra) -> LoopPlan:
    return LoopPlan(
        train=cfg.train,
        model=model_config_for(cfg.model, load_manifest(dataset)),
        dataset_dir=str(dataset),
        run_dir=str(run_dir),
        threads_per_worker=1,
        shuffle_buffer=0,
        images=ImageGrids(every=0, samples=4, split="test"),
        **extra,
    )


def test_the_loop_plan_round_trips_through_pickling(tmp_path, tiny_dataset, make_config):
    cfg = make_config(tmp_path, tiny_dataset)
    objectives = EpochObjectives(("val/coherence_mean",), cfg.eval, "test")
    plan = _plan(
        cfg,
        tiny_dataset,
        tmp_path / "run",
        objectives=objectives,
        run_id="abc",
        tracking_uri="https://alice:s3cret@mlflow.example",
    )
    for dumps, loads in ((pickle.dumps, pickle.loads), (ray.cloudpickle.dumps, pickle.loads)):
        again = loads(dumps({PLAN_KEY: plan}))[PLAN_KEY]  # as train_loop_config carries it
        assert again == plan
        assert again.model.beta == cfg.model.beta and again.train.epochs == cfg.train.epochs
    assert "s3cret" not in repr(plan)  # Ray Train's run state shows the config's repr


def test_the_loop_plan_is_validated_where_it_is_built(tmp_path, tiny_dataset, make_config):
    cfg = make_config(tmp_path, tiny_dataset)
    with pytest.raises(ValueError, match="held_splits must be 'train' and 'val'"):
        _plan(cfg, tiny_dataset, tmp_path, held_splits={"train": None})
    with pytest.raises(TypeError, match="TrainSection and an MVTCAEConfig"):
        LoopPlan(
            train=cfg.train.model_dump(),
            model=None,
            dataset_dir="",
            run_dir="",
            threads_per_worker=1,
            shuffle_buffer=0,
            images=ImageGrids(0, 1, "test"),
        )


@pytest.fixture
def tracked(tmp_path):
    """A RUNNING MLflow run in a SQLite store, written through a RunLogger (as a trial's)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow_client(uri)
    experiment = client.create_experiment("lifecycle", artifact_location=str(tmp_path / "art"))
    run_id = client.create_run(experiment, run_name="t").info.run_id
    run = TrackedRun(run_id, "t", uri, tracker=RunLogger(uri, run_id), error_tag="test.error")
    return run, client


def test_a_run_whose_training_raises_ends_failed(tmp_path, tiny_dataset, make_config, tracked):
    run, client = tracked
    cfg = make_config(tmp_path, tiny_dataset, "train.num_workers=1", "train.epochs=1")
    # In process with neither held splits nor datasets: the first epoch finds no input.
    plan = FitPlan(loop=_plan(cfg, tiny_dataset, tmp_path / "run"), datasets=None)
    with pytest.raises(KeyError, match="no dataset 'train'"), closing(run):
        fit(cfg, "t", plan, in_process=True)
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["test.error"].startswith("KeyError: ")


def test_a_failed_runs_error_tag_is_redacted(tracked):
    run, client = tracked
    with pytest.raises(OSError), closing(run):
        raise OSError("cannot reach postgresql://bob:hunter2@db.example/mlflow")
    got = client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    tag = got.data.tags["test.error"]
    assert "hunter2" not in tag and "bob:***@db.example" in tag


def test_a_run_stopped_by_tune_is_left_open(tracked):
    run, client = tracked
    with pytest.raises(SystemExit), closing(run, leave_open_on=(SystemExit,)):
        raise SystemExit(0)
    assert client.get_run(run.run_id).info.status == "RUNNING"


def test_an_interrupted_train_run_ends_killed(tmp_path, tiny_dataset, make_config):
    """The `mvtcae train` path: the run opened with its config and dataset logged, then an
    interrupt stops what writes to it first, ends it KILLED and is raised as Interrupted."""
    import mlflow

    cfg = make_config(tmp_path, tiny_dataset)
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    stopped = []
    try:
        run = open_run(cfg, "interrupted-run", str(tiny_dataset), load_manifest(tiny_dataset))
        with (
            pytest.raises(Interrupted) as raised,
            closing(run, on_interrupt=lambda: stopped.append(True)),
        ):
            raise KeyboardInterrupt
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    assert stopped == [True]
    assert raised.value.signum == signal.SIGINT and run.run_id in raised.value.run
    got = mlflow_client(run.tracking_uri).get_run(run.run_id)
    assert got.info.status == "KILLED"
    assert got.data.tags["mvtcae.error"].startswith("KeyboardInterrupt")
    assert got.data.params["model.beta"] == str(cfg.model.beta)  # the config was logged
