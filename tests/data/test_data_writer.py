"""Writing arrays into shards: manifest contents, exact round trip, atomic failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mvtcae.data import (
    DatasetError,
    DatasetWriter,
    load_manifest,
    load_split_arrays,
    validate_dataset,
    write_arrays,
    write_dataset_from_npz,
)
from mvtcae.data.files import sha256_file
from mvtcae.data.format import ModalitySpec


def _assert_same(read: dict, split) -> None:
    """Present values equal the input, absent ones are zero, masks and labels unchanged."""
    for m, original in split.data.items():
        present = split.masks[m]
        np.testing.assert_array_equal(read["masks"][m], present)
        np.testing.assert_array_equal(read["data"][m][present], original[present])
        assert not read["data"][m][~present].any()
        assert read["data"][m].dtype == original.dtype
    np.testing.assert_array_equal(read["labels"], split.labels)


def test_round_trip_with_plain_pyarrow(dataset: Path, arrays) -> None:
    for name, split in arrays.items():
        read = load_split_arrays(dataset, name)
        _assert_same(read, split)
        np.testing.assert_array_equal(read["ids"], np.arange(split.num_rows))


def test_manifest_records_modalities_splits_and_checksums(dataset: Path, arrays) -> None:
    manifest = load_manifest(dataset)
    assert manifest.format_version == 1 and manifest.name == "tiny"
    img, vec = manifest.modalities["img"], manifest.modalities["vec"]
    assert (img.shape, img.dtype, img.transform, img.scale) == (
        (3, 6, 5),
        "uint8",
        "divide_255",
        1 / 255,
    )
    assert (img.distribution, vec.distribution) == ("laplace", "normal")
    assert (vec.shape, vec.dtype, vec.scale) == ((7,), "float32", 1.0)
    assert manifest.num_classes == 4 and manifest.has_labels
    train = manifest.splits["train"]
    assert train.num_rows == 96 and [s.num_rows for s in train.shards] == [32, 32, 32]
    assert train.present_rows["img"] == int(arrays["train"].masks["img"].sum())
    for shard in train.shards:
        assert shard.sha256 == sha256_file(dataset / shard.file)
    raw = json.loads((dataset / "manifest.json").read_text())
    assert raw["modalities"]["img"]["shape"] == [3, 6, 5]


def test_tensor_columns_are_canonical_fixed_shape_tensors(dataset: Path) -> None:
    schema = pq.read_schema(dataset / "train" / "part-00000.parquet")
    assert schema.field("img").type.extension_name == "arrow.fixed_shape_tensor"
    assert list(schema.field("img").type.shape) == [3, 6, 5]
    assert str(schema.field("img__present").type) == "bool"


def test_float64_is_stored_as_float32_and_labels_infer_num_classes(tmp_path: Path) -> None:
    x = np.linspace(0, 1, 30).reshape(10, 3)
    manifest = write_arrays(
        tmp_path / "d", {"train": {"data": {"x": x}, "labels": np.arange(10) % 3}}
    )
    assert manifest.modalities["x"].dtype == "float32" and manifest.num_classes == 3
    assert manifest.splits["train"].present_rows == {"x": 10}
    read = load_split_arrays(tmp_path / "d", "train")
    np.testing.assert_allclose(read["data"]["x"], x, rtol=1e-6)
    assert read["masks"]["x"].all() and validate_dataset(tmp_path / "d").name == "d"


def test_npz_with_split_prefixes(tmp_path: Path, arrays) -> None:
    columns = {}
    for split, part in arrays.items():
        columns.update({f"{split}/{m}": a for m, a in part.data.items()})
        columns.update({f"{split}/{m}__present": a for m, a in part.masks.items()})
        columns[f"{split}/label"] = part.labels
    np.savez(tmp_path / "mine.npz", **columns)
    manifest = write_dataset_from_npz(tmp_path / "mine.npz", tmp_path / "out", name="mine")
    assert set(manifest.splits) == {"train", "test"} and manifest.name == "mine"
    _assert_same(load_split_arrays(tmp_path / "out", "test"), arrays["test"])


def test_npz_single_split_with_test_fraction_and_missing(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", a=rng.normal(size=(200, 4)), b=rng.normal(size=(200, 2)))
    manifest = write_dataset_from_npz(
        tmp_path / "a.npz", tmp_path / "out", test_fraction=0.25, missing_ratio=0.4
    )
    assert (manifest.splits["train"].num_rows, manifest.splits["test"].num_rows) == (150, 50)
    assert not manifest.has_labels
    ids = np.concatenate([load_split_arrays(tmp_path / "out", s)["ids"] for s in ("train", "test")])
    assert sorted(ids) == list(range(200))
    validate_dataset(tmp_path / "out")


@pytest.mark.parametrize(
    ("data", "masks", "message"),
    [
        ({"x": np.array([[0.0, np.nan], [1.0, 2.0]])}, None, "column 'x', row 0: NaN or Inf"),
        ({"x": np.ones((2, 2)), "y": np.ones((3, 2))}, None, "disagree on row count"),
        ({"x": np.ones((2, 2))}, {"x": np.array([True, False])}, "row 1 has no modality"),
        ({"s": np.array([["a"], ["b"]])}, None, "not numeric"),
    ],
)
def test_writer_rejects_bad_arrays(tmp_path: Path, data, masks, message) -> None:
    with pytest.raises(DatasetError, match=message):
        write_arrays(tmp_path / "bad", {"train": {"data": data, "masks": masks}})
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging directory


def test_failed_write_leaves_nothing_and_keeps_the_old_dataset(dataset: Path, arrays) -> None:
    before = (dataset / "manifest.json").read_text()
    spec = {
        "img": ModalitySpec(shape=(3, 6, 5), dtype="uint8"),
        "vec": ModalitySpec(shape=(7,), dtype="float32"),
    }
    with pytest.raises(RuntimeError, match="interrupted"):  # noqa: SIM117
        with DatasetWriter(
            dataset, name="new", modalities=spec, overwrite=True, rows_per_shard=8
        ) as w:
            part = arrays["train"]
            w.add("train", part.data, part.masks)  # shards are on disk in the staging dir
            raise RuntimeError("interrupted")
    assert (dataset / "manifest.json").read_text() == before
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["ds"]
    validate_dataset(dataset)


def test_existing_target_needs_overwrite(dataset: Path, arrays) -> None:
    with pytest.raises(FileExistsError, match="overwrite"):
        write_arrays(dataset, arrays)
    manifest = write_arrays(dataset, {"train": arrays["train"]}, overwrite=True)
    assert set(manifest.splits) == {"train"} and not (dataset / "test").exists()
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["ds"]


def test_chunked_writer_reports_the_row_within_the_split(tmp_path: Path) -> None:
    specs = {m: ModalitySpec(shape=(2,), dtype="float32") for m in ("a", "b")}
    ones = {m: np.ones((5, 2), np.float32) for m in specs}
    present = np.ones(5, bool)
    with pytest.raises(DatasetError, match=r"split 'train', presence columns: row 7 has no"):  # noqa: SIM117
        with DatasetWriter(tmp_path / "d", name="d", modalities=specs) as writer:
            writer.add("train", ones, {"a": present, "b": present})
            gap = present.copy()
            gap[2] = False
            writer.add("train", ones, {"a": gap, "b": gap})
    with pytest.raises(DatasetError, match="masks for unknown modalities"):  # noqa: SIM117
        with DatasetWriter(tmp_path / "d", name="d", modalities=specs) as writer:
            writer.add("train", ones, {"c": present})
    assert list(tmp_path.iterdir()) == []
