"""Small splits held by every training worker: read once by the driver, shared through Ray's
object store, sampled per epoch like ``torch.utils.data.DistributedSampler``.

For a dataset that fits in memory, a Ray Data pipeline per split and epoch (split coordinator
actors, an execution per epoch, Arrow to NumPy to torch per batch) costs seconds of fixed time
per run and trial for a few MB. Here the driver reads each split once with pyarrow
(`load_split_arrays`) and puts it in the object store (`put_splits`); each worker gets it
zero-copy on its node (`HeldSplit.fetch`) and, every epoch, takes its share of one permutation
of the whole split that depends only on (seed, epoch), so that every rank draws a disjoint,
equal share and the order is the same after a resume; in training, the group's steps walk that
permutation from its start (`HeldSplit.step_rows`), so that a restart inside an epoch goes on
from where the last checkpoint was, on any number of workers. Values stay in their stored dtype (uint8
images stay 4x smaller) and become model input batch by batch (`to_model_batch`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import ray
import torch

from mvtcae.data.files import DatasetFiles
from mvtcae.data.format import ID_COLUMN, LABEL_COLUMN, Manifest, presence_column
from mvtcae.data.ray_input import to_model_batch
from mvtcae.data.reader import load_split_arrays
from mvtcae.model.batch import MultimodalBatch


def put_splits(files: DatasetFiles, splits: Sequence[str]) -> dict[str, ray.ObjectRef]:
    """Read each split once (pyarrow, in shard order) and put its arrays in the object store."""
    return {split: ray.put(load_split_arrays(files, split)) for split in splits}


@dataclass(frozen=True)
class HeldSplit:
    """A whole split's columns as tensors of their stored dtype, on one device."""

    columns: dict[str, torch.Tensor]
    manifest: Manifest

    @classmethod
    def fetch(cls, ref: ray.ObjectRef, manifest: Manifest, device: torch.device | str) -> HeldSplit:
        """The split put by `put_splits`, on ``device``."""
        arrays = ray.get(ref)
        columns = {ID_COLUMN: arrays["ids"]}
        if arrays["labels"] is not None:
            columns[LABEL_COLUMN] = arrays["labels"]
        for m in manifest.modalities:
            columns[m] = arrays["data"][m]
            columns[presence_column(m)] = arrays["masks"][m]
        # The object store's arrays are read-only and only ever read; on a CPU they are shared.
        return cls({k: _tensor(v, device) for k, v in columns.items()}, manifest)

    def __len__(self) -> int:
        return int(self.columns[ID_COLUMN].shape[0])

    def rank_rows(
        self, rank: int, world: int, *, shuffle: bool, seed: int = 0, epoch: int = 0
    ) -> torch.Tensor:
        """This rank's rows of an evaluation pass: every ``world``-th row of one permutation of
        the split (seeded by ``seed + epoch``, the same on every rank) or of the stored order,
        so that the group reads every row once."""
        n = len(self)
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed + epoch) % 2**63)
            return torch.randperm(n, generator=generator)[rank::world]
        return torch.arange(n)[rank::world]

    def step_rows(
        self,
        rank: int,
        world: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
    ) -> torch.Tensor:
        """This rank's training rows for an epoch, in step order: step ``s`` of the group takes
        positions ``start + s*G`` to ``start + (s+1)*G`` of one permutation of the split
        (seeded by ``seed + epoch``, the same on every rank; ``G = batch_size * world``), each
        rank ``batch_size`` of them. The rows left for a last, shorter step are shared equally
        (at most ``world - 1`` sit out).

        The positions the group has trained are therefore always a prefix of the epoch's order,
        whatever ``world`` is: a run restarted inside an epoch, on as many workers or on
        another number, goes on from position ``start`` and trains every row of the epoch
        once. Read as ``batches(rows, batch_size)``.
        """
        n = len(self)
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed + epoch) % 2**63)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        order = order[min(start, n) :]
        group = batch_size * world
        full = len(order) // group
        steps = order[: full * group].reshape(full, world, batch_size)[:, rank, :].reshape(-1)
        tail = order[full * group :]
        share = len(tail) // world
        return torch.cat([steps, tail[rank * share : (rank + 1) * share]])

    def batches(self, rows: torch.Tensor, batch_size: int) -> Iterator[MultimodalBatch]:
        """Model batches of the given rows, in that order."""
        device = self.columns[ID_COLUMN].device
        rows = rows.to(device)
        for start in range(0, len(rows), batch_size):
            take = rows[start : start + batch_size]
            yield to_model_batch(
                {k: v.index_select(0, take) for k, v in self.columns.items()},
                self.manifest,
                device,
            )


def _tensor(values: Any, device: torch.device | str) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only NumPy memory, never written
        return torch.as_tensor(values).to(device)
