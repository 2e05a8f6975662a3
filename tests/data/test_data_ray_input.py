"""Ray Data input: arrays written as shards come back as MultimodalBatches through real Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from ray.data.dataset import MaterializedDataset

from mvtcae.data import (
    DatasetError,
    iter_model_batches,
    load_manifest,
    load_split_arrays,
    open_splits,
    ray_input,
    to_model_batch,
)
from mvtcae.data.files import dataset_files
from mvtcae.data.format import ID_COLUMN
from mvtcae.data.held import HeldSplit, put_splits
from mvtcae.data.ray_input import should_materialize
from mvtcae.model.batch import MultimodalBatch
from mvtcae.training.epoch_input import EpochInput
from mvtcae.training.hosts import InProcessHost

# Ray warns when it groups small shard lists into fewer read tasks than the concurrency cap.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The maximum number of concurrent tasks"),
    pytest.mark.usefixtures("own_ray"),
]


@pytest.fixture(scope="module", autouse=True)
def _no_progress_bars(own_ray) -> None:
    ray.data.DataContext.get_current().enable_progress_bars = False


def collect(batches) -> tuple[dict, list[int]]:
    """Concatenate batches into arrays keyed like load_split_arrays, plus batch sizes."""
    out: dict = {"data": {}, "masks": {}, "labels": [], "ids": []}
    sizes = []
    for batch in batches:
        assert isinstance(batch, MultimodalBatch)
        sizes.append(len(batch))
        for m in batch.data:
            out["data"].setdefault(m, []).append(batch.data[m].numpy())
            out["masks"].setdefault(m, []).append(batch.masks[m].numpy())
        out["labels"].append(batch.labels.numpy())
        out["ids"].append(batch.meta["sample_id"].numpy())
    joined = {
        "data": {m: np.concatenate(v) for m, v in out["data"].items()},
        "masks": {m: np.concatenate(v) for m, v in out["masks"].items()},
        "labels": np.concatenate(out["labels"]),
        "ids": np.concatenate(out["ids"]),
    }
    return joined, sizes


def assert_matches_arrays(read: dict, split) -> None:
    """Rows (matched by sample id) equal the written arrays in the model's input form."""
    order = np.argsort(read["ids"])
    np.testing.assert_array_equal(read["ids"][order], np.arange(split.num_rows))
    expected_img = torch.from_numpy(split.data["img"]).float() / 255.0
    expected_img[~torch.from_numpy(split.masks["img"])] = 0
    np.testing.assert_allclose(read["data"]["img"][order], expected_img.numpy(), atol=1e-7)
    expected_vec = np.where(split.masks["vec"][:, None], split.data["vec"], 0)
    np.testing.assert_array_equal(read["data"]["vec"][order], expected_vec)
    for m in ("img", "vec"):
        np.testing.assert_array_equal(read["masks"][m][order], split.masks[m])
    np.testing.assert_array_equal(read["labels"][order], split.labels)


@pytest.fixture(scope="module")
def materialized(written) -> dict[str, ray.data.Dataset]:
    """Both splits opened in materialised mode."""
    return open_splits(written[0], materialize=True)


def test_round_trip_materialized(written, materialized) -> None:
    root, arrays = written
    manifest = load_manifest(root)
    assert set(materialized) == {"train", "test"}
    # The train split adds a per-epoch block-order shuffle on top of the materialised blocks.
    assert isinstance(materialized["test"], MaterializedDataset)
    batches = list(iter_model_batches(materialized["train"], manifest, 20, shuffle=True, seed=0))
    first = batches[0]
    assert first.data["img"].shape == (20, 3, 6, 5) and first.data["img"].dtype == torch.float32
    assert first.data["vec"].dtype == torch.float32 and first.masks["img"].dtype == torch.bool
    assert first.labels.dtype == torch.int64 and float(first.data["img"].max()) <= 1.0
    read, sizes = collect(batches)
    # One short batch; with a local shuffle buffer Ray may hand it out before the last one.
    assert sorted(sizes) == [16, 20, 20, 20, 20]
    assert_matches_arrays(read, arrays["train"])
    test_read, _ = collect(iter_model_batches(materialized["test"], manifest, 1000))
    assert_matches_arrays(test_read, arrays["test"])


def test_round_trip_streaming_through_a_data_iterator(written) -> None:
    root, arrays = written
    splits = open_splits(root, materialize=False, splits=["train"])
    assert list(splits) == ["train"] and not isinstance(splits["train"], MaterializedDataset)
    iterator = splits["train"].iterator()  # what ray.train.get_dataset_shard returns
    batches = iter_model_batches(
        iterator, load_manifest(root), 20, shuffle=True, local_shuffle_buffer_size=50
    )
    read, sizes = collect(batches)
    assert sum(sizes) == 96
    assert_matches_arrays(read, arrays["train"])


def test_epochs_are_shuffled_differently_and_drop_last(written, materialized) -> None:
    manifest = load_manifest(written[0])
    epochs = [
        collect(
            iter_model_batches(
                materialized["train"], manifest, 20, shuffle=True, seed=7, epoch=e, drop_last=True
            )
        )
        for e in (0, 1)
    ]
    for read, sizes in epochs:
        assert sizes == [20, 20, 20, 20] and len(set(read["ids"])) == 80
    assert not np.array_equal(epochs[0][0]["ids"], epochs[1][0]["ids"])


def test_held_splits_are_shared_and_sampled_like_a_distributed_sampler(written) -> None:
    root, arrays = written
    manifest = load_manifest(root)
    refs = put_splits(dataset_files(root), ["train", "test"])
    held = HeldSplit.fetch(refs["train"], manifest, "cpu")
    assert len(held) == 96
    world = 3
    epochs = {}
    for epoch in (1, 2):
        shares = [
            held.step_rows(rank, world, 10, shuffle=True, seed=5, epoch=epoch)
            for rank in range(world)
        ]
        assert [len(s) for s in shares] == [32, 32, 32]  # equal: DDP steps in lockstep
        read, sizes = collect(b for s in shares for b in held.batches(s, 10))
        assert sizes == [10, 10, 10, 2] * world
        assert_matches_arrays(read, arrays["train"])  # disjoint shares, every row, values intact
        epochs[epoch] = read["ids"]
    assert not np.array_equal(epochs[1], epochs[2])  # a new permutation every epoch
    # An epoch's order depends only on (seed, epoch, rank, world): what a resumed run relies on.
    again = HeldSplit.fetch(refs["train"], manifest, "cpu").step_rows(
        0, world, 10, shuffle=True, seed=5, epoch=2
    )
    np.testing.assert_array_equal(collect(held.batches(again, 10))[0]["ids"], epochs[2][:32])
    # Without equal shares (validation), 24 test rows over 5 ranks: every row exactly once.
    test = HeldSplit.fetch(refs["test"], manifest, "cpu")
    shares = [test.rank_rows(r, 5, shuffle=False) for r in range(5)]
    assert [len(s) for s in shares] == [5, 5, 5, 5, 4]
    read, _ = collect(b for s in shares for b in test.batches(s, 5))
    assert_matches_arrays(read, arrays["test"])


def _group_steps(held: HeldSplit, world: int, batch: int, start: int) -> list[list[int]]:
    """The sample ids of each step of the group (rank 0's batch first) in epoch 4, from
    position ``start`` of its order."""
    per_rank = []
    for rank in range(world):
        rows = held.step_rows(rank, world, batch, shuffle=True, seed=3, epoch=4, start=start)
        per_rank.append([b.meta["sample_id"].tolist() for b in held.batches(rows, batch)])
    return [sum((ranks[s] for ranks in per_rank), []) for s in range(len(per_rank[0]))]


def test_a_group_restarted_inside_an_epoch_on_another_world_goes_on_where_it_stopped(
    written,
) -> None:
    """The group's steps walk one permutation of the epoch from its start, so that after k
    steps the rows trained are a prefix of it: a restart from that position, on 3 workers
    after 2 or on the same 2, trains the remaining rows once and none of the first ones."""
    root, _ = written
    held = HeldSplit.fetch(
        put_splits(dataset_files(root), ["train"])["train"], load_manifest(root), "cpu"
    )
    ids = held.columns[ID_COLUMN].tolist()
    order = torch.randperm(96, generator=torch.Generator().manual_seed(3 + 4)).tolist()
    whole = _group_steps(held, 2, 8, start=0)  # 2 workers x 8 rows: 6 steps of 16
    assert [len(s) for s in whole] == [16] * 6
    flat = sum(whole, [])
    assert flat == [ids[i] for i in order]  # the epoch's permutation, in step order
    # Two steps trained (positions 0..31), then the restart at position 32.
    for world in (2, 3):
        rest = sum(_group_steps(held, world, 8, start=32), [])
        # Each remaining row at most once, none of the first ones; of the 64 left, at most
        # world - 1 sit out the last, shorter step.
        assert len(set(rest)) == len(rest) >= 64 - (world - 1)
        assert set(rest) <= set(flat[32:])
    assert sum(_group_steps(held, 2, 8, start=32), []) == flat[32:]  # as if never stopped


def test_a_streamed_shard_restarted_inside_an_epoch_trains_what_it_had_left(written) -> None:
    """A streamed split cannot seek: a worker restarted at position 16 of an epoch reads and
    drops its first 16 // batch_size batches, and trains the rest (``limit`` counts those).
    Ray Data's read order is not reproducible from one read of an epoch to the next (two reads
    differ here, with or without a shuffle buffer), so the dropped rows need not be the ones
    trained before: the bound is the count. The epoch trains as many rows as it had left, every
    one once; at most the 16 trained before the restart can be among them."""
    root, _ = written
    manifest = load_manifest(root)
    splits = open_splits(root, materialize=False, splits=["train"])
    host = InProcessHost(run_dir=str(root), keep=None, datasets=splits)
    for buffer in (0, 32):
        stream = EpochInput(
            "train", None, manifest, 8, torch.device("cpu"), host, shuffle_buffer=buffer
        )
        whole = [b.meta["sample_id"].tolist() for b in stream.batches(3)]
        assert sum(len(b) for b in whole) == 96
        rest = [b.meta["sample_id"].tolist() for b in stream.batches(3, start=16)]
        after = [i for b in rest for i in b]
        assert len(rest) == len(whole) - 2 and len(after) == len(set(after)) == 80
        assert len(list(stream.batches(3, limit=3, start=16))) == 3


def test_equal_shares_leave_out_at_most_world_minus_one_rows(written) -> None:
    root, _ = written
    held = HeldSplit.fetch(
        put_splits(dataset_files(root), ["test"])["test"], load_manifest(root), "cpu"
    )
    shares = [held.step_rows(r, 5, 3, shuffle=True, seed=1, epoch=0) for r in range(5)]
    used = torch.cat(shares)
    assert len(used) == 20 and len(set(used.tolist())) == 20  # 24 rows, 4 sit out


def test_auto_mode_materialises_only_small_datasets(written, monkeypatch) -> None:
    manifest = load_manifest(written[0])
    assert should_materialize(manifest)
    monkeypatch.setattr(ray_input, "MATERIALIZE_MAX_BYTES", manifest.row_bytes * 100)
    assert not should_materialize(manifest)  # 120 rows > 100 rows' worth


def test_open_splits_validates_first(dataset: Path) -> None:
    (dataset / "test" / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="test/part-00000.parquet"):
        open_splits(dataset)


def test_to_model_batch_on_in_memory_arrays(dataset: Path, arrays) -> None:
    manifest = load_manifest(dataset)
    split = load_split_arrays(dataset, "test")
    columns = {m: a for m, a in split["data"].items()}
    columns.update({f"{m}__present": a for m, a in split["masks"].items()})
    columns.update(label=split["labels"], sample_id=split["ids"])
    batch = to_model_batch(columns, manifest, "cpu")
    read, _ = collect([batch])
    assert_matches_arrays(read, arrays["test"])


@pytest.mark.slow
def test_ray_train_workers_with_fractional_cpus(dataset: Path, tmp_path: Path) -> None:
    """Two Train workers at 0.5 CPU each read disjoint shards that cover the split."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path / "seen"
    out.mkdir()
    manifest = load_manifest(dataset)

    def loop(config: dict) -> None:
        shard = ray.train.get_dataset_shard("train")
        rank = ray.train.get_context().get_world_rank()
        for epoch in range(2):
            ids = [
                b.meta["sample_id"].numpy()
                for b in iter_model_batches(shard, manifest, 16, shuffle=True, epoch=epoch)
            ]
            np.save(f"{config['out']}/rank{rank}-epoch{epoch}.npy", np.concatenate(ids))
            ray.train.report({"epoch": epoch})

    trainer = TorchTrainer(
        loop,
        train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets=open_splits(dataset, materialize=False, splits=["train"]),
        run_config=RunConfig(name="data-input", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()
    for epoch in range(2):
        parts = [np.load(out / f"rank{r}-epoch{epoch}.npy") for r in range(2)]
        assert all(len(p) for p in parts)
        assert sorted(np.concatenate(parts)) == list(range(96))
