"""Missing-ratio masks and the built-in datasets (PolyMNIST re-creation, mfeat), offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mvtcae.cli import main
from mvtcae.data import (
    load_split_arrays,
    prepare_mfeat,
    prepare_polymnist,
    random_presence,
    validate_dataset,
)
from mvtcae.data.polymnist import compose_modality, split_digit_pools
from mvtcae.data.sources import mnist_digits


@pytest.mark.parametrize(("ratio", "modalities"), [(0.0, 3), (0.3, 5), (0.6, 2), (0.9, 6)])
def test_random_presence_fraction_and_no_empty_rows(ratio: float, modalities: int) -> None:
    masks = random_presence(
        20_000, [f"m{i}" for i in range(modalities)], ratio, np.random.default_rng(3)
    )
    present = np.stack(list(masks.values()), axis=1)
    assert present.any(axis=1).all()
    expected = ratio - ratio**modalities / modalities  # one modality comes back in empty rows
    for column in present.T:
        assert abs((1 - column.mean()) - expected) < 0.015


def test_random_presence_rejects_ratio_one() -> None:
    with pytest.raises(ValueError, match="missing_ratio"):
        random_presence(5, ["a"], 1.0, np.random.default_rng(0))


def test_mfeat_views_labels_and_standardisation(tmp_path: Path) -> None:
    manifest = prepare_mfeat(tmp_path / "mfeat", test_fraction=0.25)
    assert {m: s.shape for m, s in manifest.modalities.items()} == {
        "fou": (76,),
        "fac": (216,),
        "kar": (64,),
        "pix": (240,),
        "zer": (47,),
        "mor": (6,),
    }
    rows = {split: spec.num_rows for split, spec in manifest.splits.items()}
    assert rows == {"train": 1300, "val": 200, "test": 500}
    assert manifest.num_classes == 10 and "fou" in manifest.preprocessing
    train = load_split_arrays(tmp_path / "mfeat", "train")
    val = load_split_arrays(tmp_path / "mfeat", "val")
    test = load_split_arrays(tmp_path / "mfeat", "test")
    assert np.bincount(train["labels"]).tolist() == [130] * 10
    assert np.bincount(val["labels"]).tolist() == [20] * 10
    ids = [set(train["ids"]), set(val["ids"]), set(test["ids"])]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 2000
    fac = train["data"]["fac"]
    np.testing.assert_allclose(fac.mean(axis=0), 0, atol=1e-4)
    assert np.allclose(fac.std(axis=0), 1, atol=1e-3) and fac.dtype == np.float32
    # Labels in the files are sorted: 200 rows per class, in order.
    assert (train["labels"] == train["ids"] // 200).all()


def test_mfeat_missing_ratio_masks(tmp_path: Path) -> None:
    manifest = prepare_mfeat(tmp_path / "m", missing_ratio=0.5, seed=4)
    validate_dataset(tmp_path / "m")
    read = load_split_arrays(tmp_path / "m", "train")
    present = np.stack([read["masks"][m] for m in manifest.modalities], axis=1)
    assert present.any(axis=1).all()
    assert abs((1 - present.mean()) - (0.5 - 0.5**6 / 6)) < 0.03
    for m, values in read["data"].items():
        assert not values[~read["masks"][m]].any()  # absent rows are zero-filled
        assert values[read["masks"][m]].any()


def test_compose_inverts_background_under_the_digit() -> None:
    background = np.full((40, 50, 3), 10, dtype=np.uint8)
    digits = np.zeros((2, 28, 28), dtype=np.uint8)
    digits[0, 5:9, 5:9] = 200
    digits[1, 0, 0] = 100  # below the binarisation threshold: no ink
    images = compose_modality(digits, background, np.random.default_rng(0))
    assert images.shape == (2, 3, 28, 28) and images.dtype == np.uint8
    assert (images[0, :, 5:9, 5:9] == 245).all() and (images[0] == 245).sum() == 3 * 16
    assert (images[1] == 10).all()


def test_train_and_test_digit_pools_are_disjoint() -> None:
    _, labels = mnist_digits()
    pools = split_digit_pools(labels, 0.2, np.random.default_rng(0))
    assert pools["train"].shape == (10, 400) and pools["test"].shape == (10, 100)
    assert not set(pools["train"].ravel()) & set(pools["test"].ravel())
    assert all((labels[pools["test"][c]] == c).all() for c in range(10))


def test_polymnist_small(tmp_path: Path) -> None:
    manifest = prepare_polymnist(tmp_path / "p", n_train=300, n_test=80, missing_ratio=0.2, seed=1)
    assert manifest.modality_names == ["m0", "m1", "m2", "m3", "m4"]
    spec = manifest.modalities["m2"]
    assert (spec.shape, spec.dtype, spec.transform) == ((3, 28, 28), "uint8", "divide_255")
    assert manifest.splits["test"].num_rows == 80 and manifest.num_classes == 10
    assert manifest.splits["val"].num_rows == 16  # n_test // 5 by default
    no_val = prepare_polymnist(tmp_path / "q", n_train=20, n_test=10, n_val=0)
    assert set(no_val.splits) == {"train", "test"}
    validate_dataset(tmp_path / "p")
    read = load_split_arrays(tmp_path / "p", "train")
    present = np.stack([read["masks"][m] for m in manifest.modalities], axis=1)
    assert present.any(axis=1).all() and 0.1 < 1 - present.mean() < 0.3
    # Two modalities of a tuple use different photos, so their pixels differ.
    both = read["masks"]["m0"] & read["masks"]["m1"]
    assert (read["data"]["m0"][both] != read["data"]["m1"][both]).mean() > 0.5
    assert set(np.unique(read["labels"])) == set(range(10))


def test_cli_prepare_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        main,
        ["data", "prepare", "polymnist", str(tmp_path / "p"), "--n-train", "64", "--n-test", "32"],
    )
    assert result.exit_code == 0, result.output
    assert "train: 64 rows" in result.output and "m0: uint8[3, 28, 28] laplace" in result.output
    again = runner.invoke(main, ["data", "prepare", "polymnist", str(tmp_path / "p")])
    assert again.exit_code == 1 and "overwrite" in again.output
    result = runner.invoke(
        main, ["data", "prepare", "mfeat", str(tmp_path / "m"), "--missing-ratio", "0.3"]
    )
    assert result.exit_code == 0, result.output
    assert "train: 1400 rows" in result.output and "val: 200 rows" in result.output
    result = runner.invoke(
        main, ["data", "prepare", "mfeat", str(tmp_path / "m0"), "--val-fraction", "0"]
    )
    assert result.exit_code == 0 and "train: 1600 rows" in result.output
    assert "val:" not in result.output
    np.savez(tmp_path / "u.npz", **{"train/a": np.ones((10, 2)), "test/a": np.ones((4, 2))})
    result = runner.invoke(
        main, ["data", "prepare", "arrays", str(tmp_path / "u.npz"), str(tmp_path / "u")]
    )
    assert result.exit_code == 0, result.output
    assert "test: 4 rows" in result.output
