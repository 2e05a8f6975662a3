"""Splits held in memory as arrays (`SplitArrays`), their rows split into train and test, and
written as a dataset (`write_arrays`, through the atomic `DatasetWriter`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from mvtcae.config.locations import basename
from mvtcae.data.files import DatasetFiles
from mvtcae.data.format import DatasetError, Manifest, ModalitySpec, checked_name
from mvtcae.data.writer import DatasetWriter


@dataclass
class SplitArrays:
    """One split held in memory: modality -> (n, *shape) array, optional masks and labels."""

    data: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    ids: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        """Number of samples in the split."""
        return int(next(iter(self.data.values())).shape[0])


def as_split_arrays(value: SplitArrays | Mapping) -> SplitArrays:
    """Accept a SplitArrays or a dict with ``data`` (and optional ``masks``, ``labels``, ``ids``).

    A plain mapping of modality -> array (no ``data`` key) is taken as fully observed data.
    """
    if isinstance(value, SplitArrays):
        return value
    if "data" in value:
        return SplitArrays(
            data=dict(value["data"]),
            masks=None if value.get("masks") is None else dict(value["masks"]),
            labels=value.get("labels"),
            ids=value.get("ids"),
        )
    return SplitArrays(data={k: np.asarray(v) for k, v in value.items()})


def infer_modality_spec(name: str, array: np.ndarray) -> ModalitySpec:
    """Stored dtype and defaults for a user array: uint8 stays uint8 (an image in [0, 1]
    after dividing by 255, Laplace decoder), other numbers are stored as float32 (Normal)."""
    shape = tuple(int(d) for d in array.shape[1:])
    if not shape:
        raise DatasetError(f"modality {name!r}: array has shape {array.shape}; need (n, *shape)")
    if array.dtype == np.uint8:
        kind = "image" if len(shape) in (2, 3) else "tensor"
        return ModalitySpec(
            shape=shape, dtype="uint8", distribution="laplace", transform="divide_255", kind=kind
        )
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number):
        kind = "vector" if len(shape) == 1 else "tensor"
        return ModalitySpec(shape=shape, dtype="float32", distribution="normal", kind=kind)
    raise DatasetError(f"modality {name!r}: dtype {array.dtype} is not numeric")


def write_arrays(
    out_dir: str | os.PathLike,
    splits: Mapping[str, SplitArrays | Mapping],
    *,
    name: str | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    num_classes: int | None = None,
    rows_per_shard: int | None = None,
    overwrite: bool = False,
    description: str = "",
    preprocessing: dict | None = None,
    source: dict | None = None,
) -> Manifest:
    """Write in-memory splits (``{"train": {"data": {m: (n, *shape)}, "masks": {m: (n,)},
    "labels": (n,)}, ...}``) as a dataset directory and return its manifest.

    Modality specs are inferred from the first split's arrays unless given; ``num_classes``
    defaults to ``max(label) + 1`` when labels are given.
    """
    parts = {split: as_split_arrays(value) for split, value in splits.items()}
    if not parts:
        raise DatasetError("no splits given")
    first = next(iter(parts.values()))
    specs = dict(modalities or {m: infer_modality_spec(m, a) for m, a in first.data.items()})
    has_labels = _labels_consistent(parts)
    if has_labels and num_classes is None:
        num_classes = int(max(np.max(p.labels) for p in parts.values() if len(p.labels))) + 1
    if name is None:
        name = basename(DatasetFiles(out_dir).location)
        where = f"{out_dir} (no name given, so the directory's name is the dataset name)"
        checked_name(name, "dataset name", where)
    with DatasetWriter(
        out_dir,
        name=name,
        modalities=specs,
        num_classes=num_classes,
        has_labels=has_labels,
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
        description=description,
        preprocessing=preprocessing,
        source=source,
    ) as writer:
        for split, part in parts.items():
            writer.add(split, part.data, part.masks, part.labels, part.ids)
    return writer.manifest


write_dataset_from_arrays = write_arrays
"""Alias of ``write_arrays``."""


def _labels_consistent(parts: Mapping[str, SplitArrays]) -> bool:
    with_labels = {split for split, p in parts.items() if p.labels is not None}
    if with_labels and with_labels != set(parts):
        missing = sorted(set(parts) - with_labels)
        raise DatasetError(f"labels given for some splits but not for {missing}")
    return bool(with_labels)


def split_off_test(
    part: SplitArrays, test_fraction: float, rng: np.random.Generator
) -> dict[str, SplitArrays]:
    """Split one SplitArrays into ``train`` and ``test`` by a random permutation of rows."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = rng.permutation(part.num_rows)
    n_test = max(1, int(round(test_fraction * part.num_rows)))
    pick = {"test": np.sort(order[:n_test]), "train": np.sort(order[n_test:])}
    return {split: _take(part, rows) for split, rows in pick.items()}


def _take(part: SplitArrays, rows: np.ndarray) -> SplitArrays:
    return SplitArrays(
        data={m: a[rows] for m, a in part.data.items()},
        masks=None if part.masks is None else {m: a[rows] for m, a in part.masks.items()},
        labels=None if part.labels is None else part.labels[rows],
        ids=np.asarray(part.ids)[rows] if part.ids is not None else rows.astype(np.int64),
    )
