"""Fixtures for tracking tests: a real SQLite MLflow store per test and a tiny real MVTCAE."""

from __future__ import annotations

import mlflow
import pytest
from tiny_models import tiny_model

from mvtcae.config import TrackingSection
from testkit import torch_threads


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every tracking test runs with one torch thread."""
    with torch_threads(1):
        yield


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> TrackingSection:
    """A TrackingSection on a fresh SQLite store; MLflow's global URIs are restored afterwards."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    yield TrackingSection(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        experiment_name="tests",
        registered_model_name="tiny-mvtcae",
        promotion_metric="eval/joint_nll",
        promotion_mode="min",
    )
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


@pytest.fixture
def make_model():
    """Factory for tiny real models, one per seed."""
    return tiny_model
