"""The evaluated split, held as stored NumPy arrays, and the subsets of modalities measured."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mvtcae.data import load_manifest, load_split_arrays
from mvtcae.data.files import DatasetError
from mvtcae.model.batch import MultimodalBatch

if TYPE_CHECKING:
    from mvtcae import MVTCAE


@dataclass
class EvalSplit:
    """A split held as stored NumPy arrays; batches are built on demand in model scale."""

    data: dict[str, np.ndarray]
    scales: dict[str, float]
    masks: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(next(iter(self.masks.values())).shape[0])

    def take(self, rows: np.ndarray) -> EvalSplit:
        """The sub-split of the given row indices."""
        return EvalSplit(
            data={m: x[rows] for m, x in self.data.items()},
            scales=dict(self.scales),
            masks={m: x[rows] for m, x in self.masks.items()},
            labels=None if self.labels is None else self.labels[rows],
        )

    def rows_with(self, modalities: Sequence[str]) -> np.ndarray:
        """Indices of rows where every one of ``modalities`` is present."""
        keep = np.ones(len(self), dtype=bool)
        for m in modalities:
            keep &= self.masks[m]
        return np.flatnonzero(keep)

    def values(self, modality: str, rows: np.ndarray | slice) -> Tensor:
        """Model-scale float32 values of one modality's rows (CPU)."""
        x = torch.from_numpy(np.ascontiguousarray(self.data[modality][rows])).float()
        scale = self.scales[modality]
        return x * scale if scale != 1.0 else x

    def batch(
        self,
        rows: np.ndarray | slice,
        modalities: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> MultimodalBatch:
        """A MultimodalBatch of the given rows and modalities (all by default) on ``device``."""
        mods = list(modalities or self.data)
        labels = None if self.labels is None else torch.from_numpy(self.labels[rows])
        batch = MultimodalBatch(
            data={m: self.values(m, rows) for m in mods},
            masks={m: torch.from_numpy(np.ascontiguousarray(self.masks[m][rows])) for m in mods},
            labels=labels,
        )
        return batch.to(device)


def load_eval_split(
    dataset_dir: str | Path, split: str, max_rows: int | None = None, seed: int = 0
) -> EvalSplit:
    """Read a split with `load_split_arrays`, keeping a seeded random subset of ``max_rows``."""
    manifest = load_manifest(dataset_dir)
    arrays = load_split_arrays(dataset_dir, split)
    result = EvalSplit(
        data=arrays["data"],
        scales={m: spec.scale for m, spec in manifest.modalities.items()},
        masks=arrays["masks"],
        labels=arrays["labels"],
    )
    if max_rows is not None and len(result) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(result), max_rows, replace=False))
        result = result.take(rows)
    return result


def subsets_of_size(
    modalities: Sequence[str], k: int, limit: int | None, rng: np.random.Generator
) -> list[tuple[str, ...]]:
    """All k-subsets of the modalities, or a seeded sample of ``limit`` of them."""
    subsets = list(itertools.combinations(modalities, k))
    if limit is not None and len(subsets) > limit:
        picked = sorted(rng.choice(len(subsets), limit, replace=False))
        subsets = [subsets[i] for i in picked]
    return subsets


def nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values (NaN when none is)."""
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


class ModalityMismatchError(DatasetError):
    """A dataset whose modalities (names or shapes) are not the model's."""


def check_modalities(model: MVTCAE, split: EvalSplit, dataset_dir: str | Path) -> None:
    """Refuse a dataset that lacks any of the model's modalities or holds one in another shape."""
    missing = [m for m in model.modalities if m not in split.data]
    if missing:
        raise ModalityMismatchError(
            f"{dataset_dir} lacks the model's modalities {missing}; it has {list(split.data)}, "
            f"the model {list(model.modalities)}"
        )
    dims = model.model_config.input_dims or {}
    for m in model.modalities:
        have, want = tuple(split.data[m].shape[1:]), tuple(dims.get(m, ()))
        if want and have != want:
            raise ModalityMismatchError(
                f"{dataset_dir}: modality {m!r} has shape {have}, the model's is {want}"
            )
