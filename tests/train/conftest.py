"""Fixtures for the training tests: a tiny learnable multimodal dataset written by the data layer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mvtcae.config import ExperimentConfig, load_config

REPO = Path(__file__).resolve().parents[2]


def _split(rng: np.random.Generator, n: int, mixing: list[np.ndarray]) -> dict:
    """Three 12-d views of one 4-d latent that depends on a 4-class label."""
    labels = rng.integers(0, 4, n)
    z = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[labels]
    data = {
        f"v{i}": (np.tanh(z @ w) + 0.1 * rng.normal(size=(n, 12))).astype(np.float32)
        for i, w in enumerate(mixing)
    }
    return {"data": data, "labels": labels}


def write_tiny_dataset(directory: Path, n_train: int = 600, n_test: int = 150) -> Path:
    """Write the tiny dataset with the platform's own writer; return its directory."""
    from mvtcae.data import write_arrays

    rng = np.random.default_rng(0)
    mixing = [rng.normal(scale=0.7, size=(4, 12)) for _ in range(3)]
    splits = {"train": _split(rng, n_train, mixing), "test": _split(rng, n_test, mixing)}
    write_arrays(directory, splits, name="tiny-views", num_classes=4)
    return directory


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
    """One intra-op thread: tiny models on a shared 2-core runner only lose to thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_config():
    """``make_config(root, dataset, *overrides)``: the shrunk demo config (see `tiny_config`)."""
    return tiny_config
