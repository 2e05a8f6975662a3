"""Builders and fixtures shared by the test packages (on sys.path via pytest's `pythonpath`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _views_split(rng: np.random.Generator, n: int, mixing: list[np.ndarray]) -> dict:
    """Views of one latent whose mean depends on the class label (latent dim = classes)."""
    classes, width = mixing[0].shape
    labels = rng.integers(0, classes, n)
    z = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[labels]
    data = {
        f"v{i}": (np.tanh(z @ w) + 0.1 * rng.normal(size=(n, width))).astype(np.float32)
        for i, w in enumerate(mixing)
    }
    return {"data": data, "labels": labels}


def write_tiny_views(
    directory: Path,
    *,
    n_train: int,
    n_test: int,
    classes: int,
    width: int,
    name: str,
    n_views: int = 3,
) -> Path:
    """Write a tiny labelled multi-view dataset with the platform's own writer; return its dir."""
    from mvtcae.data import write_arrays

    rng = np.random.default_rng(0)
    mixing = [rng.normal(scale=0.7, size=(classes, width)) for _ in range(n_views)]
    splits = {
        "train": _views_split(rng, n_train, mixing),
        "test": _views_split(rng, n_test, mixing),
    }
    write_arrays(directory, splits, name=name, num_classes=classes)
    return directory


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads: tiny models on a shared 2-core box only lose to
    thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
