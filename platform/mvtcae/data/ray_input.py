"""Ray Data input: dataset directory -> Ray Datasets per split -> MultimodalBatch.

CPU budget: Ray Data read tasks here ask for ``READ_TASK_CPUS`` (0.25) CPU each (at most
``READ_CONCURRENCY`` at once), plus one 1-CPU file-listing task per execution when
streaming, and training workers should ask for a fraction of a CPU too (e.g.
``ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5})`` on a 2-CPU machine, or
``ray.init(num_cpus=...)`` with a few logical CPUs more than the workers hold). If workers
hold every logical CPU, read tasks can never be scheduled and training waits forever for
its first batch.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray.data import DataIterator, Dataset, FileShuffleConfig, RandomSeedConfig

from mvtcae.data.files import DatasetFiles, dataset_files
from mvtcae.data.format import ID_COLUMN, LABEL_COLUMN, Manifest, load_manifest, presence_column
from mvtcae.data.validate import ensure_valid
from mvtcae.model.batch import MultimodalBatch

# Ray groups small shard lists into fewer read tasks than the cap and warns at every epoch.
warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for 'ReadFiles")

READ_TASK_CPUS = 0.25
READ_CONCURRENCY = 4
"""At most this many read tasks at once: each read worker holds a few hundred MB of decode
buffers, so unbounded fractional-CPU readers would grow memory with the shard count."""
MATERIALIZE_MAX_BYTES = 1 << 30
"""Auto mode materialises when the whole dataset (uncompressed) is at most this many bytes
and at most a fifth of the object store."""


def open_splits(
    path: str | os.PathLike | DatasetFiles,
    materialize: bool | None = None,
    *,
    splits: list[str] | None = None,
    validate: bool = True,
    revalidate: bool = False,
    shuffle_train_files: bool = True,
    seed: int | None = None,
    reshuffle_each_epoch: bool = True,
    read_num_cpus: float = READ_TASK_CPUS,
    read_concurrency: int | None = READ_CONCURRENCY,
) -> dict[str, Dataset]:
    """Open the dataset at ``path`` (a directory or a URI such as ``s3://bucket/prefix``) as one
    Ray Dataset per split, validated first (``ensure_valid``: a dataset validated before and
    unchanged since is not re-hashed; ``revalidate`` checks it in full). Shards are read where
    they are, through the location's file system.

    ``materialize=None`` materialises when the dataset is small (see
    ``MATERIALIZE_MAX_BYTES``): small datasets are then read once, here, with pyarrow and held
    in the object store, and skip the per-epoch re-read; larger ones stream through Ray Data's
    read tasks. The train
    split's shard order is shuffled (a file shuffle when streaming, a block-order shuffle when
    materialised), seeded by ``seed``: anew at every execution (every epoch) with
    ``reshuffle_each_epoch``, else the same order every time, which makes an epoch's order
    independent of how many executions came before it (what an exact resume needs). Read tasks
    ask for ``read_num_cpus`` CPU each, at most ``read_concurrency`` at once (see the module
    docstring for the CPU budget).
    """
    files = dataset_files(path)
    manifest = ensure_valid(files, full=revalidate) if validate else load_manifest(files)
    names = splits or list(manifest.splits)
    if materialize is None:
        materialize = should_materialize(manifest)
    return {
        split: _open_split(
            manifest,
            files,
            split,
            materialize,
            shuffle_train_files and split == "train",
            seed,
            reshuffle_each_epoch,
            read_num_cpus,
            read_concurrency,
        )
        for split in names
    }


def should_materialize(manifest: Manifest) -> bool:
    """Whether the auto mode keeps this dataset in the object store."""
    total = manifest.row_bytes * sum(s.num_rows for s in manifest.splits.values())
    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    limit = min(MATERIALIZE_MAX_BYTES, store / 5) if store else MATERIALIZE_MAX_BYTES
    return total <= limit


def _open_split(
    manifest: Manifest,
    files: DatasetFiles,
    split: str,
    materialize: bool,
    shuffle_files: bool,
    seed: int | None,
    reshuffle: bool,
    read_num_cpus: float,
    read_concurrency: int | None,
) -> Dataset:
    paths = manifest.shard_paths(files, split)
    if materialize:
        # Small enough to hold: read here and hand the tables to the object store (one block per
        # shard). Ray Data's read tasks would start worker processes first, seconds of fixed
        # cost per run and trial for a few MB (jobs/bench_overhead.py measures it).
        tables = [pq.read_table(path, filesystem=files.fs) for path in paths]
        dataset = ray.data.from_arrow(tables or [manifest.arrow_schema().empty_table()])
        if shuffle_files:
            return dataset.randomize_block_order(
                seed=RandomSeedConfig(seed=seed, reseed_after_execution=reshuffle)
            )
        return dataset
    file_shuffle = (
        FileShuffleConfig(seed=seed, reseed_after_execution=reshuffle) if shuffle_files else None
    )
    return ray.data.read_parquet(
        paths,
        filesystem=files.fs,
        num_cpus=read_num_cpus,
        concurrency=read_concurrency,
        shuffle=file_shuffle,
        partitioning=None,
    )


def to_model_batch(
    batch: Mapping[str, Any], manifest: Manifest, device: torch.device | str = "cpu"
) -> MultimodalBatch:
    """Convert a column batch (NumPy or torch) into a MultimodalBatch on ``device``.

    Stored values move to the device first (uint8 is 4x smaller than float32), then become
    float32 with the manifest's transform (``divide_255``: [0, 1]); masks become bool,
    labels int64; sample ids go to ``meta["sample_id"]``.
    """
    data, masks = {}, {}
    for name, spec in manifest.modalities.items():
        stored = _as_tensor(batch[name], device)
        values = stored.reshape(stored.shape[0], *spec.shape).to(torch.float32)
        if spec.scale != 1.0:
            # In place only when the conversion made a new tensor (never the caller's memory).
            fresh = stored.dtype != torch.float32
            values = values.mul_(spec.scale) if fresh else values * spec.scale
        data[name] = values
        masks[name] = _as_tensor(batch[presence_column(name)], device).to(torch.bool)
    labels = None
    if manifest.has_labels and LABEL_COLUMN in batch:
        labels = _as_tensor(batch[LABEL_COLUMN], device).to(torch.int64)
    meta = {}
    if ID_COLUMN in batch:
        meta["sample_id"] = _as_tensor(batch[ID_COLUMN], device).to(torch.int64)
    return MultimodalBatch(data=data, masks=masks, labels=labels, meta=meta)


def _as_tensor(values: Any, device: torch.device | str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device, non_blocking=True)
    array = np.asarray(values)
    with warnings.catch_warnings():
        # Ray hands out read-only arrays; the tensor is only read, never written in place.
        warnings.simplefilter("ignore", UserWarning)
        return torch.as_tensor(array).to(device, non_blocking=True)


def iter_model_batches(
    source: Dataset | DataIterator,
    manifest: Manifest,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    shuffle: bool = False,
    local_shuffle_buffer_size: int | None = None,
    seed: int | None = None,
    epoch: int = 0,
    drop_last: bool = False,
    prefetch_batches: int = 2,
) -> Iterator[MultimodalBatch]:
    """Yield MultimodalBatches from a Ray Dataset or DataIterator (a Train dataset shard).

    ``shuffle=True`` mixes rows through a local buffer (default ``4 * batch_size`` rows),
    seeded by ``seed + epoch`` when a seed is given. Shard order is the dataset's business:
    ``open_splits`` reshuffles the train split's shards every epoch. (A block-order shuffle
    here would be an all-to-all barrier that stops a streamed dataset from streaming.)
    """
    shuffle_seed = None if seed is None else seed + epoch
    buffer = (local_shuffle_buffer_size or 4 * batch_size) if shuffle else None
    batches = source.iter_torch_batches(
        batch_size=batch_size,
        device="cpu",
        drop_last=drop_last,
        local_shuffle_buffer_size=buffer,
        local_shuffle_seed=shuffle_seed if buffer else None,
        prefetch_batches=prefetch_batches,
    )
    for batch in batches:
        yield to_model_batch(batch, manifest, device)
