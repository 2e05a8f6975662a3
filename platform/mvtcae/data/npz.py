"""A user's ``.npz`` archive of arrays (``SPLIT/MODALITY`` keys) read into splits and written as a
dataset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mvtcae.data.arrays import SplitArrays, split_off_test, write_arrays
from mvtcae.data.format import (
    ID_COLUMN,
    LABEL_COLUMN,
    PRESENT_SUFFIX,
    DatasetError,
    Manifest,
    checked_name,
)
from mvtcae.data.missing import with_missing


def read_npz_splits(path: str | os.PathLike) -> dict[str, SplitArrays]:
    """Read user arrays from a ``.npz``: keys ``SPLIT/MODALITY``, ``SPLIT/MODALITY__present``,
    ``SPLIT/label`` and ``SPLIT/sample_id``; keys without ``SPLIT/`` belong to split ``train``.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            split, column = _npz_key(path, key)
            grouped.setdefault(split, {})[column] = archive[key]
    if not grouped:
        raise DatasetError(f"{path}: the archive holds no arrays")
    return {split: _columns_to_split(path, split, cols) for split, cols in grouped.items()}


def _npz_key(path: str | os.PathLike, key: str) -> tuple[str, str]:
    """(split, column) of an archive key ``SPLIT/COLUMN``, or (``train``, key) without a split.

    The split becomes a shard directory, so both parts must be safe names.
    """
    if key.count("/") > 1:
        raise DatasetError(
            f"{path}: array key {key!r} has more than one '/'; use SPLIT/COLUMN or COLUMN"
        )
    split, slash, column = key.partition("/")
    if not slash:
        split, column = "train", key
    where = f"{path}: array key {key!r}"
    return checked_name(split, "split name", where), checked_name(column, "column name", where)


def _columns_to_split(path: str | os.PathLike, split: str, cols: dict) -> SplitArrays:
    labels = cols.pop(LABEL_COLUMN, None)
    ids = cols.pop(ID_COLUMN, None)
    masks = {
        c.removesuffix(PRESENT_SUFFIX): cols.pop(c)
        for c in list(cols)
        if c.endswith(PRESENT_SUFFIX)
    }
    if not cols:
        raise DatasetError(f"{path}: split {split!r} has no modality arrays")
    unknown = set(masks) - set(cols)
    if unknown:
        raise DatasetError(f"{path}: split {split!r} has masks for unknown {sorted(unknown)}")
    return SplitArrays(data=cols, masks=masks or None, labels=labels, ids=ids)


def write_dataset_from_npz(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    test_fraction: float | None = None,
    missing_ratio: float = 0.0,
    seed: int = 0,
    **kwargs,
) -> Manifest:
    """Turn a user's ``.npz`` (see ``read_npz_splits``) into a dataset directory.

    ``test_fraction`` splits a single-split archive into train/test; ``missing_ratio`` > 0
    draws presence masks (combined with any masks in the archive).
    """
    parts = read_npz_splits(npz_path)
    rng = np.random.default_rng(seed)
    if test_fraction is not None:
        if len(parts) != 1:
            raise DatasetError(f"{npz_path}: test_fraction needs a single split, has {list(parts)}")
        parts = split_off_test(next(iter(parts.values())), test_fraction, rng)
    if missing_ratio > 0:
        parts = {s: with_missing(p, missing_ratio, rng) for s, p in parts.items()}
    kwargs.setdefault("source", {"npz": str(Path(npz_path).resolve())})
    return write_arrays(out_dir, parts, **kwargs)
