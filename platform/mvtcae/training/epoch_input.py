"""A worker's batches of a split, epoch by epoch: its share of a split held in memory, or its Ray
Data shard, in an order that depends only on (seed, rank, epoch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from mvtcae import MultimodalBatch
from mvtcae.data import iter_model_batches
from mvtcae.data.held import HeldSplit
from mvtcae.training.hosts import LoopHost


class EpochInput:
    """A worker's batches of one split each epoch: its share of the split held in memory
    (`HeldSplit`, when the driver put the split in the object store), else its Ray Data shard.
    A held split is fetched inside the first epoch's iteration, so that its cost shows in that
    epoch's first-batch wait."""

    def __init__(
        self,
        split: str,
        held_ref: Any,
        manifest: Any,
        batch_size: int,
        device: torch.device,
        host: LoopHost,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> None:
        self.split, self.manifest, self.batch_size = split, manifest, batch_size
        self.device, self.host, self.rank, self.world = device, host, host.rank, host.world
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.held_ref = held_ref
        self._held: HeldSplit | None = None

    def batches(self, epoch: int, limit: int | None = None) -> Iterator[MultimodalBatch]:
        """This epoch's batches (at most ``limit``)."""
        shuffle = self.shuffle_buffer > 0
        if self.held_ref is not None:
            if self._held is None:
                self._held = HeldSplit.fetch(self.held_ref, self.manifest, self.device)
            # Training shares must be equal (DDP steps in lockstep); validation uses every row.
            rows = self._held.rank_rows(
                self.rank,
                self.world,
                shuffle=shuffle,
                seed=self.seed,
                epoch=epoch,
                equal=self.split == "train",
            )
            batches = self._held.batches(rows, self.batch_size)
        else:
            batches = iter_model_batches(
                self.host.shard(self.split),
                self.manifest,
                self.batch_size,
                device=self.device,
                shuffle=shuffle,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                seed=data_order_seed(self.seed, self.rank),
                epoch=epoch,
            )
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            yield batch


def data_order_seed(seed: int, rank: int) -> int:
    """The base seed of a rank's row order; epoch ``e`` shuffles with ``data_order_seed + e``,
    so the order of any epoch depends only on (seed, rank, epoch), also after a resume."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
