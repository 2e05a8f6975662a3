"""Tiny real datasets for the data tests: NumPy arrays written as real Parquet shards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mvtcae.data import SplitArrays, random_presence, write_arrays

N_TRAIN, N_TEST = 96, 24


def make_split(n: int, seed: int, missing_ratio: float = 0.3) -> SplitArrays:
    """An image (uint8 3x6x5), a float vector and labels, with random presence masks."""
    rng = np.random.default_rng(seed)
    data = {
        "img": rng.integers(0, 256, size=(n, 3, 6, 5), dtype=np.uint8),
        "vec": rng.normal(size=(n, 7)).astype(np.float32),
    }
    masks = random_presence(n, data, missing_ratio, rng)
    return SplitArrays(data=data, masks=masks, labels=rng.integers(0, 4, size=n))


@pytest.fixture
def arrays() -> dict[str, SplitArrays]:
    """Train and test splits as in-memory arrays."""
    return {"train": make_split(N_TRAIN, 1), "test": make_split(N_TEST, 2)}


@pytest.fixture
def dataset(tmp_path: Path, arrays: dict[str, SplitArrays]) -> Path:
    """The arrays written as a dataset with several shards per split."""
    out = tmp_path / "ds"
    write_arrays(out, arrays, name="tiny", num_classes=4, rows_per_shard=32)
    return out


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, SplitArrays]]:
    """One dataset per test module, with its arrays; tests must not modify it."""
    arrays = {"train": make_split(N_TRAIN, 1), "test": make_split(N_TEST, 2)}
    root = tmp_path_factory.mktemp("shared") / "ds"
    write_arrays(root, arrays, name="tiny", num_classes=4, rows_per_shard=32)
    return root, arrays
