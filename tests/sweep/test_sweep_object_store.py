"""A sweep whose dataset, Tune state, trial checkpoints and study artifacts live on an object
store (a real moto S3 server), as the KubeRay tuning RayJob runs it: every trial streams the
shards from the bucket, the sweep finishes, registers the best trial from its ``s3://``
checkpoint, and a second start finds the sweep already there."""

from __future__ import annotations

import json
import urllib.request

import pytest
from ray.util.state import list_actors
from sweep_helpers import tiny_tune_file, write_tiny_dataset

from mvtcae import storage
from mvtcae.config import ConfigError
from testkit import create_bucket, s3_environment, s3_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3_and_ray(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server with bucket ``sweeps``; Ray starts inside the AWS environment. Yields
    the Ray dashboard's address."""
    import ray

    from mvtcae.storage.ray_session import start_local_ray

    with s3_server(tmp_path_factory.mktemp("moto")) as endpoint, s3_environment(endpoint):
        create_bucket(endpoint, "sweeps")
        dashboard = start_local_ray(num_cpus=4)
        try:
            yield dashboard
        finally:
            ray.shutdown()


def test_a_sweep_keeps_its_state_on_s3_and_registers_from_there(s3_and_ray, tmp_path) -> None:
    from mvtcae.config import load_sweep_config
    from mvtcae.config.sweep import SWEEP_STATE_FILE
    from mvtcae.sweep import run_sweep
    from mvtcae.tracking import client_for

    tune = {
        "study_name": "s3-sweep",
        "num_samples": 2,
        "max_concurrent": 1,
        "seed": 3,
        "asha": {"enabled": False},
        # Worker groups, not the default in-process trials: Ray Train's path through object
        # storage (its checkpoint upload, Tune's Train callback, the dashboard's Train tab).
        "trials_in_process": False,
    }
    dataset = "s3://sweeps/datasets/tiny"
    write_tiny_dataset(dataset)
    path = tiny_tune_file(tmp_path, dataset, tune, epochs=1)
    overrides = ["train.storage_path=s3://sweeps/ray", "tracking.registered_model_name=s3-sweep"]
    spec = load_sweep_config(path, overrides)
    assert spec.experiment_dir == "s3://sweeps/ray/s3-sweep"

    result = run_sweep(spec)

    assert result.finished and len(result.trials) == 2
    assert all(t["state"] == "COMPLETE" for t in result.trials), result.trials
    state = json.loads(storage.read_text(storage.join(spec.experiment_dir, SWEEP_STATE_FILE)))
    assert state["parent_run_id"] == result.parent_run_id
    trials = json.loads(storage.read_text(result.artifacts["trials"]))
    assert [t["number"] for t in trials] == [0, 1]
    assert result.artifacts["trials"] == "s3://sweeps/ray/s3-sweep/study/trials.json"
    train_runs = storage.join(spec.experiment_dir, "train_runs")
    assert len(storage.list_dirs(train_runs)) == 2  # one Ray Train run per trial
    # ... and the dashboard's Train tab lists them (Train records its state for it).
    request = urllib.request.Request(f"{s3_and_ray}/api/train/v2/runs/v1")
    request.add_header("Authorization", f"Bearer {_ray_token()}")
    with urllib.request.urlopen(request, timeout=30) as answer:
        shown = json.load(answer)["train_runs"]
    assert sorted(run["name"] for run in shown) == storage.list_dirs(train_runs)
    assert {run["status"] for run in shown} == {"FINISHED"}
    # A one-machine Ray has no nodes to drain: no preemption watcher started with the runs.
    # This cluster's address: other Ray instances may run on the machine.
    listed = list_actors(address=s3_and_ray, limit=1000, raise_on_missing_output=False)
    actors = {a.class_name for a in listed}
    assert "RayTrainWorker" in actors and "PreemptionWatcher" not in actors
    checkpoint = result.best["checkpoint"]
    assert checkpoint.startswith(train_runs + "/")
    assert storage.is_file(storage.join(checkpoint, "model.safetensors"))

    client = client_for(spec.experiment.tracking)
    champion = client.get_model_version_by_alias("s3-sweep", "champion")
    assert champion.run_id == result.best["mlflow_run_id"]
    assert champion.tags["mvtcae.dataset.source"] == dataset
    for trial in result.trials:  # each trial's run names the dataset in the bucket
        run = client.get_run(trial["mlflow_run_id"])
        (used,) = run.inputs.dataset_inputs
        assert json.loads(used.dataset.source)["uri"] == dataset
        times = run.data.metrics  # and where the trial's time went
        assert 0 < times["time/trainer_fit_s"] < times["time/trial_total_s"]
        assert {"time/run_setup_s", "time/validation_s", "time/dataset_open_s"} <= set(times)
    assert {a.path for a in client.list_artifacts(result.parent_run_id, "study")} >= {
        "study/trials.json",
        "study/pareto_front.json",
    }

    with pytest.raises(ConfigError, match="already exists at s3://sweeps/ray/s3-sweep"):
        run_sweep(load_sweep_config(path, overrides))


def _ray_token() -> str:
    """The local Ray's dashboard token: $RAY_AUTH_TOKEN, else the file Ray generates
    (~/.ray/auth_token, see Ray's token-authentication docs)."""
    import os
    from pathlib import Path

    return (
        os.environ.get("RAY_AUTH_TOKEN")
        or (Path.home() / ".ray" / "auth_token").read_text().strip()
    )
