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

    def batches(
        self, epoch: int, limit: int | None = None, start: int = 0
    ) -> Iterator[MultimodalBatch]:
        """This epoch's batches (at most ``limit``), from position ``start`` of the epoch's
        order: the rows the group trained before a mid-epoch checkpoint are not trained again.

        Held splits restart exactly there, on any number of workers (`HeldSplit.step_rows`).
        A streamed shard cannot seek: each worker reads and drops its first
        ``start // (batch_size * world)`` batches, so the epoch trains as many rows as it had
        left. Ray Data does not read an epoch's blocks in the same order twice (measured: two
        reads of one shard differ, with or without a shuffle buffer), so the dropped rows need
        not be the ones trained before: some rows of that epoch may be trained twice, and as
        many not at all.
        """
        shuffle = self.shuffle_buffer > 0
        skip = 0
        if self.held_ref is not None:
            if self._held is None:
                self._held = HeldSplit.fetch(self.held_ref, self.manifest, self.device)
            if self.split == "train":  # DDP steps in lockstep: equal steps, in the epoch's order
                rows = self._held.step_rows(
                    self.rank,
                    self.world,
                    self.batch_size,
                    shuffle=shuffle,
                    seed=self.seed,
                    epoch=epoch,
                    start=start,
                )
            else:  # validation uses every row
                rows = self._held.rank_rows(
                    self.rank, self.world, shuffle=shuffle, seed=self.seed, epoch=epoch
                )
            batches = self._held.batches(rows, self.batch_size)
        else:
            skip = start // (self.batch_size * self.world)
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
        taken = 0
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            if limit is not None and taken >= limit:
                break
            taken += 1
            yield batch


def data_order_seed(seed: int, rank: int) -> int:
    """The base seed of a rank's shuffle buffer; epoch ``e`` shuffles with
    ``data_order_seed + e``. (The rows that reach the buffer come in the order Ray Data reads
    them, which is not the same from one read to the next: a streamed epoch is not repeated
    exactly after a resume; a held one is, see `HeldSplit`.)"""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
