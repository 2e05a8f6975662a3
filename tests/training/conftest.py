"""Fixtures for the training tests: a tiny learnable multimodal dataset written by the data layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvtcae.config import ExperimentConfig, load_config
from testkit import torch_threads, write_tiny_views

REPO = Path(__file__).resolve().parents[2]


def write_tiny_dataset(directory: Path | str, n_train: int = 600, n_test: int = 150) -> Path | str:
    """Three 12-d views of a 4-class latent, written with the platform's own writer."""
    return write_tiny_views(
        directory, n_train=n_train, n_test=n_test, classes=4, width=12, name="tiny-views"
    )


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 600/150-row dataset of three vector views."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


def tiny_config(root: Path, dataset: Path, *extra: str) -> ExperimentConfig:
    """The real demo config, shrunk to the tiny dataset, two 1-CPU workers and a tmp store."""
    overrides = [
        "data.dataset=custom",
        f"data.dir={dataset}",
        "data.shuffle_buffer=128",
        "model.latent_dim=8",
        "train.epochs=3",
        "train.batch_size=64",
        "train.num_workers=2",
        "train.use_gpu=false",
        "train.checkpoint.num_to_keep=2",
        f"train.storage_path={root / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
        "tracking.experiment_name=train-tests",
        "tracking.registered_model_name=tiny-mvtcae",
        "eval.max_samples=150",
        "eval.probe_train_samples=200",
        "eval.probe_max_iter=200",
        "eval.classifier_epochs=1",
        f"eval.classifier_cache_dir={root / 'classifiers'}",
        "eval.nll_K=16",
        "eval.nll_batch_size_K=16",
        "eval.nll_max_samples=32",
        "eval.projection_samples=100",
        "eval.grid_samples=4",
    ]
    return load_config(REPO / "jobs" / "configs" / "demo.yaml", overrides + list(extra))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every training test runs with one torch thread."""
    with torch_threads(1):
        yield


@pytest.fixture
def make_config():
    """``make_config(root, dataset, *overrides)``: the shrunk demo config (see `tiny_config`)."""
    return tiny_config
