"""A worker's share of a small split, read once through Ray Data and then held in its memory.

When a split's order over the workers is the same at every execution (a materialised dataset
whose shard order is fixed, the default), every epoch hands each worker the same rows. Reading
them again each epoch costs a Ray Data execution (a split coordinator round trip, Arrow to
NumPy to torch per batch) for no new information. `HeldShard.collect` reads the worker's share
once, in order, onto the training device; `HeldShard.batches` then permutes it each epoch with
a generator seeded by ``seed + epoch``, so an epoch's order is a function of (seed, rank, epoch)
and a resumed run sees the order an uninterrupted one would. The permutation covers the whole
share (a full shuffle, where Ray Data's local buffer mixes only ``shuffle_buffer`` rows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from mvtcae.data.format import Manifest
from mvtcae.data.ray_input import iter_model_batches
from mvtcae.model.batch import MultimodalBatch

READ_BATCH_ROWS = 4096
"""Rows per batch of the one pass that fills the hold (fewer, larger conversions)."""


@dataclass(frozen=True)
class HeldShard:
    """Every row a worker's dataset shard yields, as one batch on the worker's device."""

    rows: MultimodalBatch

    @classmethod
    def collect(
        cls, shard: Any, manifest: Manifest, device: torch.device | str = "cpu"
    ) -> HeldShard:
        """Read a Ray Data shard (a `DataIterator` or `Dataset`) once, in its order."""
        parts = list(iter_model_batches(shard, manifest, READ_BATCH_ROWS, device=device))
        if not parts:
            raise ValueError("the worker's dataset shard is empty: nothing to hold")
        return cls(concat_batches(parts))

    def __len__(self) -> int:
        return len(self.rows)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
    ) -> Iterator[MultimodalBatch]:
        """The held rows in batches: permuted by a generator seeded with ``seed + epoch`` when
        ``shuffle``, else in the order they were read."""
        n = len(self.rows)
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed + epoch) % 2**63)
            order = torch.randperm(n, generator=generator).to(self._device())
        else:
            order = None
        end = n - n % batch_size if drop_last else n
        for start in range(0, end, batch_size):
            rows = slice(start, min(start + batch_size, n))
            yield self.rows.select(order[rows] if order is not None else rows)

    def _device(self) -> torch.device:
        return next(iter(self.rows.data.values())).device


def concat_batches(parts: list[MultimodalBatch]) -> MultimodalBatch:
    """One batch of the rows of ``parts``, in order (masks, labels and per-row tensors in
    ``meta`` included)."""
    first = parts[0]
    masks = None
    if first.masks is not None:
        masks = {m: torch.cat([p.masks[m] for p in parts]) for m in first.masks}
    labels = None if first.labels is None else torch.cat([p.labels for p in parts])
    meta = {
        key: torch.cat([p.meta[key] for p in parts])
        for key, value in first.meta.items()
        if isinstance(value, torch.Tensor)
    }
    return MultimodalBatch(
        data={m: torch.cat([p.data[m] for p in parts]) for m in first.data},
        masks=masks,
        labels=labels,
        meta=meta,
    )
