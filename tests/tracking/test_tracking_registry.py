"""Tracking URI resolution, config logging and the champion promotion gate on a real store."""

from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from mvtcae.config import TrackingSection
from mvtcae.tracking import (
    client_for,
    decide_promotion,
    flatten_config,
    log_config,
    log_metrics,
    log_model_and_register,
    resolve_artifact_location,
    resolve_tracking_uri,
    start_run,
)


def test_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingSection()) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(TrackingSection()) == "http://mlflow:5000"
    cfg = TrackingSection(tracking_uri="sqlite:////data/runs.db")
    assert resolve_tracking_uri(cfg) == "sqlite:////data/runs.db"
    assert resolve_artifact_location(cfg, resolve_tracking_uri(cfg)) == "/data/mlartifacts"
    assert resolve_tracking_uri(TrackingSection(tracking_uri="databricks")) == "databricks"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "./mlruns"])
def test_file_store_is_refused(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match="file store"):
        resolve_tracking_uri(TrackingSection(tracking_uri=uri))


def test_flatten_config_names_nested_keys():
    flat = flatten_config({"model": {"latent_dim": 8, "dims": [1, 2]}, "name": "x", "opt": None})
    assert flat == {"model.latent_dim": "8", "model.dims": "[1, 2]", "name": "x", "opt": "null"}


def test_log_config_writes_params_and_yaml(tracking, tmp_path):
    config = {"train": {"epochs": 3, "lr": 0.001}, "model": {"latent_dim": 8}}
    with start_run(tracking, run_name="cfg") as run:
        log_config(config)
        log_metrics({"train/loss": 1.5, "bad": math.nan}, step=2)
    client = client_for(tracking)
    logged = client.get_run(run.info.run_id)
    assert logged.data.params == {"train.epochs": "3", "train.lr": "0.001", "model.latent_dim": "8"}
    assert logged.data.metrics == {"train/loss": 1.5}
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path / "dl")
    )
    assert yaml.safe_load(Path(local).read_text()) == config
    experiment = client.get_experiment(logged.info.experiment_id)
    assert experiment.artifact_location.endswith("mlartifacts")


@pytest.mark.parametrize(
    ("candidate", "champion", "mode", "promoted"),
    [
        (1.0, 2.0, "min", True),
        (2.0, 1.0, "min", False),
        (2.0, 2.0, "min", False),
        (0.9, 0.8, "max", True),
        (math.nan, 2.0, "min", False),
        (1.0, None, "max", True),
    ],
)
def test_decide_promotion(candidate, champion, mode, promoted):
    assert decide_promotion(candidate, champion, mode, has_champion=True)[0] is promoted


def test_first_version_needs_a_finite_metric_to_become_champion():
    assert decide_promotion(1.0, None, "min", has_champion=False) == (True, "no current champion")
    for value in (None, math.nan, math.inf, -math.inf):
        promoted, reason = decide_promotion(value, None, "min", has_champion=False)
        assert not promoted and "no finite value" in reason


def test_a_nan_first_model_is_registered_but_never_champion(tracking, make_model):
    from mlflow.exceptions import MlflowException

    client = client_for(tracking)
    name = tracking.registered_model_name
    _, nan_first = _train_run(tracking, make_model, seed=0, nll=math.nan, pass_metrics=True)
    assert (nan_first.version, nan_first.alias, nan_first.promoted) == (1, "challenger", False)
    with pytest.raises(MlflowException):
        client.get_model_version_by_alias(name, "champion")
    assert client.get_model_version(name, "1").tags["promotion.candidate"] == "nan"
    # The next finite model becomes champion; a later NaN never replaces it.
    _, finite = _train_run(tracking, make_model, seed=1, nll=5.0, pass_metrics=True)
    assert finite.promoted and finite.alias == "champion"
    _, nan_later = _train_run(tracking, make_model, seed=2, nll=math.nan, pass_metrics=True)
    assert not nan_later.promoted
    assert int(client.get_model_version_by_alias(name, "champion").version) == 2


def _train_run(tracking: TrackingSection, make_model, seed: int, nll: float, pass_metrics: bool):
    with start_run(tracking, run_name=f"seed{seed}") as run:
        mlflow.log_metric("eval/joint_nll", nll)
        metrics = {"eval/joint_nll": nll} if pass_metrics else None
        return run.info.run_id, log_model_and_register(make_model(seed), tracking, metrics)


def test_promotion_gate_promotes_and_refuses(tracking, make_model):
    client = client_for(tracking)
    name = tracking.registered_model_name

    _, first = _train_run(tracking, make_model, seed=0, nll=10.0, pass_metrics=True)
    assert (first.version, first.alias, first.promoted) == (1, "champion", True)

    # Worse NLL, metric read back from the run: refused, tagged challenger with the comparison.
    run_id, second = _train_run(tracking, make_model, seed=1, nll=12.0, pass_metrics=False)
    assert (second.version, second.alias, second.promoted) == (2, "challenger", False)
    assert int(client.get_model_version_by_alias(name, "champion").version) == 1
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2
    tags = client.get_model_version(name, "2").tags
    assert tags["promotion.decision"] == "challenger"
    assert tags["role"] == "challenger"
    assert float(tags["promotion.candidate"]) == 12.0
    assert float(tags["promotion.champion"]) == 10.0
    assert tags["promotion.champion_version"] == "1"
    assert tags["promotion.metric"] == "eval/joint_nll"
    assert client.get_run(run_id).data.tags["promotion.decision"] == "challenger"

    # Better NLL: the champion alias moves and the old champion is marked as such.
    _, third = _train_run(tracking, make_model, seed=2, nll=8.0, pass_metrics=True)
    assert (third.version, third.alias, third.promoted) == (3, "champion", True)
    assert int(client.get_model_version_by_alias(name, "champion").version) == 3
    assert client.get_model_version(name, "1").tags["role"] == "former_champion"
    assert third.comparison["champion"] == 10.0 and third.comparison["champion_version"] == 1


def test_max_mode_gate_uses_configured_metric(tracking, make_model):
    cfg = tracking.model_copy(
        update={"promotion_metric": "eval/coherence_1", "promotion_mode": "max"}
    )
    with start_run(cfg):
        first = log_model_and_register(make_model(0), cfg, {"eval/coherence_1": 0.5})
    with start_run(cfg):
        worse = log_model_and_register(make_model(1), cfg, {"eval/coherence_1": 0.4})
    with start_run(cfg):
        better = log_model_and_register(make_model(2), cfg, {"eval/coherence_1": 0.7})
    assert [first.promoted, worse.promoted, better.promoted] == [True, False, True]


def test_checkpoint_directory_is_logged_without_its_optimizer_state(tracking, make_model, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    make_model(4).save(str(checkpoint))
    torch.save({"state": {}}, checkpoint / "optimizer.pt")
    (checkpoint / "trainer_state.json").write_text('{"epoch": 3}')
    with start_run(tracking):
        registered = log_model_and_register(checkpoint, tracking, {"eval/joint_nll": 2.0})
    local = Path(
        mlflow.artifacts.download_artifacts(registered.model_uri, dst_path=str(tmp_path / "dl"))
    )
    stored = {p.name for p in (local / "artifacts" / "model_dir").iterdir()}
    assert stored == {"model_config.json", "model.safetensors"}


def test_a_directory_without_a_model_is_refused(tracking, tmp_path):
    (tmp_path / "empty").mkdir()
    with start_run(tracking), pytest.raises(FileNotFoundError, match="lacks model_config.json"):
        log_model_and_register(tmp_path / "empty", tracking, {})


def test_model_is_logged_into_a_finished_run_by_id(tracking, make_model):
    with start_run(tracking) as run:
        mlflow.log_metric("eval/joint_nll", 3.0)
    assert mlflow.active_run() is None
    registered = log_model_and_register(make_model(5), tracking, None, run.info.run_id)
    version = client_for(tracking).get_model_version(
        tracking.registered_model_name, registered.version
    )
    assert version.run_id == run.info.run_id
    assert registered.comparison["candidate"] == 3.0
    assert mlflow.active_run() is None
