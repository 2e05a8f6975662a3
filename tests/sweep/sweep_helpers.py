"""Builders for the sweep tests: a tiny multi-view dataset and the demo config, shrunk."""

from __future__ import annotations

from pathlib import Path

import yaml

from testkit import write_tiny_views

REPO = Path(__file__).resolve().parents[2]


def write_tiny_dataset(directory: Path | str, n_train: int = 160, n_test: int = 48) -> Path | str:
    """Three 8-d views of a 3-class latent, written with the data layer's writer."""
    return write_tiny_views(
        directory, n_train=n_train, n_test=n_test, classes=3, width=8, name="tiny-sweep"
    )


def tiny_tune_file(root: Path, dataset: Path, tune: dict, epochs: int = 2) -> Path:
    """A tune YAML over the real demo config shrunk to the tiny dataset; return its path."""
    base_overrides = [
        "data.dataset=custom",
        f"data.dir={dataset}",
        "data.shuffle_buffer=0",
        "model.latent_dim=4",
        f"train.epochs={epochs}",
        "train.batch_size=32",
        "train.num_workers=1",
        "train.resources_per_worker={CPU: 0.5}",
        "train.threads_per_worker=1",
        "train.max_failures=0",
        "train.grad_clip_norm=null",
        f"train.storage_path={root / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
        "tracking.experiment_name=tune-tests",
        "tracking.registered_model_name=tiny-sweep-mvtcae",
        "eval.max_samples=48",
        "eval.coherence=false",
        "eval.latent_accuracy=false",
        "eval.plots=false",
        f"eval.classifier_cache_dir={root / 'classifiers'}",
        "eval.nll_K=8",
        "eval.nll_batch_size_K=8",
        "eval.nll_max_samples=16",
        "eval.nll_subsets_per_size=0",
    ]
    defaults = {
        "storage": f"sqlite:///{root / 'optuna.db'}",
        "space": {
            "model.alpha": {"type": "uniform", "low": 0.0, "high": 1.0},
            "model.beta": {"type": "loguniform", "low": 0.1, "high": 10.0},
            "train.optimizer.lr": {"type": "loguniform", "low": 1e-3, "high": 1e-2},
        },
        "val_max_samples": 48,
        "trial_cpus": 0.01,
    }
    body = {
        "base": str(REPO / "jobs" / "configs" / "demo.yaml"),
        "base_overrides": base_overrides,
        "tune": {**defaults, **tune},
    }
    path = root / "tune.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path
