"""The evaluation measures against hand-made models and independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mvtcae import MultimodalBatch
from mvtcae.config import EvaluationSection
from mvtcae.evaluation.coherence import coherence, coherence_of_subset
from mvtcae.evaluation.probe import linear_probe_accuracy
from mvtcae.evaluation.split import EvalSplit, subsets_of_size

N_CLASSES = 4


def one_hot_split(labels: np.ndarray, masks: dict[str, np.ndarray] | None = None) -> EvalSplit:
    """Three vector modalities that each hold the one-hot label: trivially classifiable."""
    eye = np.eye(N_CLASSES, dtype=np.float32)[labels]
    data = {m: eye.copy() for m in ("a", "b", "c")}
    masks = masks or {m: np.ones(len(labels), dtype=bool) for m in data}
    return EvalSplit(data=data, scales=dict.fromkeys(data, 1.0), masks=masks, labels=labels)


def known_generator(batch: MultimodalBatch, cond: list[str], targets: list[str]) -> dict:
    """A hand-made "model": b's generation is right for even labels only, c's always, a's never."""
    labels = batch.labels
    right = {
        "a": (labels + 1) % N_CLASSES,
        "b": torch.where(labels % 2 == 0, labels, (labels + 1) % N_CLASSES),
        "c": labels,
    }
    return {m: nn.functional.one_hot(right[m], N_CLASSES).float() for m in targets}


IDENTITY_CLASSIFIERS = {m: nn.Identity() for m in ("a", "b", "c")}


def test_coherence_of_subset_matches_the_known_generations():
    labels = np.array([0, 1, 2, 3, 0, 2, 1, 0])  # 5 of 8 even
    split = one_hot_split(labels)
    scores = coherence_of_subset(
        known_generator, IDENTITY_CLASSIFIERS, split, ["a"], ["b", "c"], batch_size=3
    )
    assert scores == {"b": 5 / 8, "c": 1.0}


def test_coherence_uses_only_rows_where_the_condition_is_present():
    labels = np.array([0, 1, 2, 3, 0, 2, 1, 0])
    present_a = np.array([True, True, False, False, True, True, True, True])  # drops a 2 and a 3
    masks = {"a": present_a, "b": np.ones(8, bool), "c": np.ones(8, bool)}
    scores = coherence_of_subset(
        known_generator, IDENTITY_CLASSIFIERS, one_hot_split(labels, masks), ["a"], ["b"]
    )
    assert scores == {"b": 4 / 6}


def test_coherence_per_size_averages_subsets_and_targets():
    labels = np.array([0, 1, 2, 3])  # half even
    metrics, details = coherence(
        known_generator,
        IDENTITY_CLASSIFIERS,
        ["a", "b", "c"],
        one_hot_split(labels),
        EvaluationSection(),
    )
    # size 1: {a}->(b .5, c 1), {b}->(a 0, c 1), {c}->(a 0, b .5); size 2: ab->c 1, ac->b .5, bc->a 0
    assert metrics["eval/coherence_1"] == pytest.approx(np.mean([0.75, 0.5, 0.25]))
    assert metrics["eval/coherence_2"] == pytest.approx(np.mean([1.0, 0.5, 0.0]))
    assert metrics["eval/coherence_mean"] == pytest.approx(0.5)
    assert set(details) == {"a", "b", "c", "a+b", "a+c", "b+c"}


def test_subset_sampling_is_bounded_and_seeded():
    mods = ["m0", "m1", "m2", "m3", "m4"]
    assert len(subsets_of_size(mods, 2, None, np.random.default_rng(0))) == 10
    picked = subsets_of_size(mods, 2, 3, np.random.default_rng(0))
    assert len(picked) == 3 and picked == subsets_of_size(mods, 2, 3, np.random.default_rng(0))


def test_linear_probe_separates_separable_latents_and_not_noise():
    rng = np.random.default_rng(0)
    y_train, y_test = rng.integers(0, 3, 300), rng.integers(0, 3, 100)
    centres = np.array([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    z_train = centres[y_train] + rng.normal(size=(300, 2)) * 0.3
    z_test = centres[y_test] + rng.normal(size=(100, 2)) * 0.3
    assert linear_probe_accuracy(z_train, y_train, z_test, y_test) == 1.0
    noise = rng.normal(size=(300, 2)), rng.normal(size=(100, 2))
    assert linear_probe_accuracy(noise[0], y_train, noise[1], y_test) < 0.6


def test_display_conversion_of_image_layouts():
    from mvtcae.evaluation.plots import to_display

    assert to_display(np.zeros((2, 3, 5, 6))).shape == (2, 5, 6, 3)
    assert to_display(np.zeros((2, 1, 5, 6))).shape == (2, 5, 6)
    stretched = to_display(np.array([[[[-1.0, 3.0]]]]))  # out of [0, 1]: rescaled, not clipped
    np.testing.assert_allclose(stretched, [[[0.0, 1.0]]])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_latent_projection_png(method, tmp_path):
    from mvtcae.evaluation.plots import project_2d, save_latent_projection

    rng = np.random.default_rng(0)
    z, labels = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    assert project_2d(z, method).shape == (40, 2)
    path = save_latent_projection(z, labels, tmp_path / f"{method}.png", method)
    assert path.read_bytes()[:4] == b"\x89PNG"
