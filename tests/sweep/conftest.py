"""Fixtures for the sweep tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from sweep_helpers import tiny_tune_file, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 160/48-row dataset of three 8-d views."""
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny") / "ds")


@pytest.fixture
def make_tune_file():
    """``make_tune_file(root, dataset, tune, epochs)``: a shrunk tune YAML (see `tiny_tune_file`)."""
    return tiny_tune_file
