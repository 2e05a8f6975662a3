"""No credential is written anywhere: a password planted in the tracking URI (a real ``mlflow
server``, basic auth in the URL), in the Optuna storage URL, in the storage path and in the
data path must not appear in MLflow params, tags, metrics or artifacts, in the server's store,
in run storage (run state, sweep state, Tune's experiment files, checkpoints), in the Optuna
database, in printed summaries or in the logs of the driver and the Ray workers."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest
from sweep_helpers import tiny_tune_file

from mvtcae.config import ConfigError, load_config
from testkit import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SECRET = "pw-" + secrets.token_hex(8)


@pytest.fixture
def clean_mlflow_credentials():
    """The tracking URI's credentials move into MLflow's variables: restore them afterwards."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                continue
    return hits


def _everything_in_mlflow(uri: str, tmp: Path) -> list[str]:
    """Every param, tag and metric name of every run, and every artifact's bytes, as text."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = []
    for experiment in client.search_experiments():
        found.append(f"{experiment.name} {experiment.artifact_location} {experiment.tags}")
        for run in client.search_runs([experiment.experiment_id]):
            found.append(repr(run.data.params) + repr(run.data.tags) + repr(run.data.metrics))
            local = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, dst_path=str(tmp / run.info.run_id), tracking_uri=uri
            )
            found += [
                p.read_bytes().decode("latin-1") for p in Path(local).rglob("*") if p.is_file()
            ]
    for model in client.search_registered_models():
        for version in client.search_model_versions(f"name = '{model.name}'"):
            found.append(repr(version.tags) + str(version.source))
    return found


def test_uris_with_credentials_in_storage_or_data_paths_are_refused_silently(tmp_path: Path):
    for override in (
        f"train.storage_path=s3://AKIAKEY:{SECRET}@bucket/runs",
        f"train.storage_path=s3://bucket/runs?secret_key={SECRET}",
        f"data.dir=s3://AKIAKEY:{SECRET}@bucket/datasets",
    ):
        with pytest.raises(ConfigError) as caught:
            load_config(None, [override])
        assert SECRET not in str(caught.value), override


def test_a_planted_password_appears_nowhere(
    tmp_path: Path, tiny_dataset: Path, platform_ray, capfd, clean_mlflow_credentials
):
    from mvtcae.config import load_sweep_config
    from mvtcae.sweep import format_sweep_summary, run_sweep
    from mvtcae.training import format_summary, train

    started = time.time()
    with MlflowServer(tmp_path / "server") as server:
        tracking_uri = server.uri.replace("http://", f"http://alice:{SECRET}@")
        optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}?password={SECRET}"
        tune_file = tiny_tune_file(
            tmp_path,
            tiny_dataset,
            {
                "study_name": "secret-sweep",
                "num_samples": 2,
                "max_concurrent": 1,
                "storage": optuna_url,
                "asha": {"enabled": False},
            },
            epochs=1,
        )
        spec = load_sweep_config(tune_file, [f"tracking.tracking_uri={tracking_uri}"])
        print(format_sweep_summary(run_sweep(spec)))
        cfg = load_config(
            None,
            [
                "data.dataset=custom",
                f"data.dir={tiny_dataset}",
                "train.epochs=1",
                "train.num_workers=1",
                "train.batch_size=32",
                "model.latent_dim=4",
                f"train.storage_path={tmp_path / 'train_runs'}",
                f"tracking.tracking_uri={tracking_uri}",
                "tracking.experiment_name=secret-train",
                "eval.coherence=false",
                "eval.plots=false",
                "eval.nll_K=4",
                "eval.nll_max_samples=8",
                "eval.max_samples=48",
                "eval.latent_accuracy=false",
                f"eval.classifier_cache_dir={tmp_path / 'cls'}",
            ],
        )
        print(format_summary(train(cfg)))
        in_mlflow = _everything_in_mlflow(server.uri, tmp_path / "downloads")
        in_server_store = _files_holding(server.root, SECRET.encode())
    out, err = capfd.readouterr()

    assert len(in_mlflow) > 10 and "alice:***@" in out  # the runs, and the redacted summary
    assert SECRET not in out and SECRET not in err
    assert not [text[:200] for text in in_mlflow if SECRET in text]
    assert not in_server_store
    assert not _files_holding(tmp_path / "ray_results", SECRET.encode())  # sweep storage
    assert not _files_holding(tmp_path / "train_runs", SECRET.encode())
    assert SECRET.encode() not in (tmp_path / "optuna.db").read_bytes()
    session = Path("/tmp/ray/session_latest")
    if session.exists() and session.resolve().stat().st_mtime >= started - 600:
        assert not _files_holding(session.resolve() / "logs", SECRET.encode())
