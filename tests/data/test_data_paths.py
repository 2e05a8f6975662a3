"""Names and paths taken from manifests, .npz keys and writer calls stay inside their directory.

Each attack is played against a real dataset written by the platform's writer into a box
directory (``tmp_path``); the box is fingerprinted before and after, so a test sees any file
that the code read into a result or wrote outside the dataset directory.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
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
from mvtcae.data.format import ModalitySpec
from mvtcae.evaluation.classifiers import ClassifierSettings, cache_path
from mvtcae.safety.names import UnsafeNameError, check_name, check_relative_path, path_inside

DIGEST = "ab" * 32
SPEC = {"m0": ModalitySpec(shape=(3,), dtype="float32")}


def _rows(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"m0": np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)}


def _tree(box: Path) -> dict[str, tuple[int, int] | None]:
    """Every entry under ``box``: size and mtime for files, None for directories."""
    return {path.relative_to(box).as_posix(): _fingerprint(path) for path in box.rglob("*")}


def _fingerprint(path: Path) -> tuple[int, int] | None:
    if path.is_dir():
        return None
    info = path.lstat()
    return info.st_size, info.st_mtime_ns


def _edit_manifest(root: Path, change: Callable[[dict], None]) -> None:
    file = root / "manifest.json"
    raw = json.loads(file.read_text())
    change(raw)
    file.write_text(json.dumps(raw))


@pytest.fixture
def boxed(tmp_path: Path) -> tuple[Path, Path]:
    """A real two-split dataset at ``BOX/inner/ds``; returns (dataset dir, box)."""
    root = tmp_path / "inner" / "ds"
    splits = {"train": {"data": _rows(8, 1)}, "test": {"data": _rows(4, 2)}}
    write_arrays(root, splits, name="boxed", rows_per_shard=4)
    return root, tmp_path


def _refused_everywhere(root: Path, split: str) -> str:
    """The manifest is refused by load, validate and read alike; returns the load message."""
    with pytest.raises(DatasetError) as loading:
        load_manifest(root)
    with pytest.raises(DatasetError):
        validate_dataset(root)
    with pytest.raises(DatasetError):
        load_split_arrays(root, split)
    message = str(loading.value)
    assert str(root / "manifest.json") in message
    return message


def test_manifest_split_name_with_dotdot_is_refused(boxed: tuple[Path, Path]) -> None:
    root, box = boxed
    _edit_manifest(root, lambda raw: raw["splits"].update({"../outside": raw["splits"]["train"]}))
    before = _tree(box)
    message = _refused_everywhere(root, "../outside")
    assert "splits" in message and "'../outside'" in message
    assert _tree(box) == before


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_manifest_shard_file_outside_the_dataset_is_refused(
    boxed: tuple[Path, Path], kind: str
) -> None:
    root, box = boxed
    # A genuine shard (right checksum, row count and schema) moved out of the dataset: the
    # only thing wrong is where the manifest points.
    outside = box / "x.parquet" if kind == "dotdot" else box / "abs" / "x.parquet"
    outside.parent.mkdir(exist_ok=True)
    shutil.move(root / "train" / "part-00000.parquet", outside)
    listed = "../../x.parquet" if kind == "dotdot" else str(outside)
    assert (root / listed).resolve() == outside.resolve()
    _edit_manifest(root, lambda raw: raw["splits"]["train"]["shards"][0].update(file=listed))
    before = _tree(box)
    message = _refused_everywhere(root, "train")
    assert "splits['train'].shards[0].file" in message and repr(listed) in message
    assert _tree(box) == before


def test_manifest_name_with_dotdot_is_refused(boxed: tuple[Path, Path]) -> None:
    root, box = boxed
    _edit_manifest(root, lambda raw: raw.update(name="../evil"))
    before = _tree(box)
    message = _refused_everywhere(root, "train")
    assert "name" in message and "'../evil'" in message
    assert _tree(box) == before


@pytest.mark.parametrize("key", ["../evil/m0", "train/sub/m0"])
def test_npz_key_with_unsafe_split_is_refused(tmp_path: Path, key: str) -> None:
    npz = tmp_path / "in.npz"
    np.savez(npz, **{"train/m0": _rows(6, 3)["m0"], key: _rows(6, 4)["m0"]})
    (tmp_path / "inner").mkdir()
    before = _tree(tmp_path)
    with pytest.raises(DatasetError) as err:
        write_dataset_from_npz(npz, tmp_path / "inner" / "out", name="npz")
    assert str(npz) in str(err.value) and repr(key) in str(err.value)
    assert _tree(tmp_path) == before


def test_writer_add_with_dotdot_split_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "inner").mkdir()
    before = _tree(tmp_path)
    with (
        pytest.raises(DatasetError, match=r"split name '\.\./x'"),
        DatasetWriter(tmp_path / "inner" / "ds", name="w", modalities=SPEC, rows_per_shard=1) as w,
    ):
        w.add("../x", _rows(2, 5))
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("name", ["../evil", "a/b", ""])
def test_writer_refuses_unsafe_dataset_name_before_writing(tmp_path: Path, name: str) -> None:
    before = _tree(tmp_path)
    with pytest.raises(DatasetError) as err:
        write_arrays(tmp_path / "inner" / "ds", {"train": {"data": _rows(2, 6)}}, name=name)
    assert "dataset name" in str(err.value) and repr(name) in str(err.value)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    ("dataset_name", "modality", "field"),
    [("../x", "m0", "dataset name"), ("/abs", "m0", "dataset name"), ("ok", "../m", "modality")],
)
def test_classifier_cache_path_stays_in_the_cache(
    tmp_path: Path, dataset_name: str, modality: str, field: str
) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as err:
        cache_path(cache, dataset_name, DIGEST, modality, ClassifierSettings())
    bad = dataset_name if field == "dataset name" else modality
    assert field in str(err.value) and repr(bad) in str(err.value)
    assert list(tmp_path.iterdir()) == []
    # Safe names still get the usual layout under the cache root.
    key = ClassifierSettings().key()
    good = cache_path(cache, "tiny-views", DIGEST, "m0", ClassifierSettings())
    assert good == cache.resolve() / f"tiny-views-{DIGEST[:16]}" / f"m0-{key}.safetensors"


GOOD_NAMES = ["train", "m0", "part-00000.parquet", "polymnist-recreation", "A.b_c-1", "x" * 128]
BAD_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "a/b",
    "/abs",
    "a\\b",
    "a\x00b",
    "a..b",
    ".hidden",
    "-flag",
    "_under",
    "a b",
    "caf\u00e9",
    "c:x",
    "x" * 129,
]


@pytest.mark.parametrize("value", GOOD_NAMES)
def test_check_name_accepts_safe_names(value: str) -> None:
    assert check_name(value, "split name") == value


@pytest.mark.parametrize("value", BAD_NAMES)
def test_check_name_refuses_unsafe_names(value: str) -> None:
    with pytest.raises(UnsafeNameError) as err:
        check_name(value, "split name")
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    assert message.startswith(f"split name {value!r}")
    assert "A-Z a-z 0-9" in message


@pytest.mark.parametrize("value", ["train/part-00000.parquet", "a/b/c.parquet", "x.parquet"])
def test_check_relative_path_accepts_nested_files(value: str) -> None:
    assert check_relative_path(value, "shard file", suffix=".parquet") == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../../x.parquet",
        "/abs/x.parquet",
        "train//x.parquet",
        "train/./x.parquet",
        "train/../x.parquet",
        "train\\x.parquet",
        "train/",
        "train/x.csv",
        "train/.parquet",
    ],
)
def test_check_relative_path_refuses_escapes_and_wrong_suffix(value: str) -> None:
    with pytest.raises(UnsafeNameError, match=r"^shard file ") as err:
        check_relative_path(value, "shard file", suffix=".parquet")
    assert repr(value) in str(err.value)


def test_path_inside_resolves_paths_under_the_root(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert path_inside(tmp_path, "a/b.parquet", "shard") == tmp_path.resolve() / "a" / "b.parquet"


@pytest.mark.parametrize("relative", ["../x", "a/../../x", "/abs/x", ".", ""])
def test_path_inside_refuses_paths_that_leave_the_root(tmp_path: Path, relative: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(UnsafeNameError, match=r"^shard ") as err:
        path_inside(root, relative, "shard")
    assert repr(relative) in str(err.value)


def test_path_inside_refuses_a_symlink_that_points_outside(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "train")
    os.symlink(root / "real", root / "alias")
    with pytest.raises(UnsafeNameError, match="outside"):
        path_inside(root, "train/part-00000.parquet", "shard")
    assert path_inside(root, "alias/x", "shard") == root.resolve() / "real" / "x"


def test_validate_refuses_a_listed_shard_behind_a_symlink(boxed: tuple[Path, Path]) -> None:
    root, box = boxed
    # The train directory becomes a link to a copy outside: names pass, the real path does not.
    shutil.move(root / "train", box / "elsewhere")
    os.symlink(box / "elsewhere", root / "train")
    with pytest.raises(DatasetError, match=r"part-00000\.parquet"):
        validate_dataset(root)
    with pytest.raises(DatasetError, match=r"part-00000\.parquet"):
        load_split_arrays(root, "train")
