"""The evaluation measures against hand-made models and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig
from mvtcae.evaluate import EvalConfig
from mvtcae.measures import (
    EvalSplit,
    coherence,
    coherence_of_subset,
    linear_probe_accuracy,
    row_log_likelihood,
    subset_proposal_nll,
    subsets_of_size,
)

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
        known_generator, IDENTITY_CLASSIFIERS, ["a", "b", "c"], one_hot_split(labels), EvalConfig()
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


@pytest.mark.parametrize(
    ("dist", "reference"),
    [
        ("normal", lambda o, s: torch.distributions.Normal(o, s)),
        ("laplace", lambda o, s: torch.distributions.Laplace(o, s)),
        ("bernoulli", lambda o, s: torch.distributions.Bernoulli(logits=o)),
    ],
)
def test_row_log_likelihood_matches_torch_distributions(dist, reference):
    torch.manual_seed(0)
    output = torch.randn(5, 3, 4)
    target = torch.rand(5, 3, 4) if dist != "bernoulli" else (torch.rand(5, 3, 4) > 0.5).float()
    expected = reference(output, 0.7).log_prob(target).sum(dim=(1, 2))
    torch.testing.assert_close(row_log_likelihood(output, target, dist, 0.7), expected)


def test_row_log_likelihood_categorical_indices_and_one_hot_agree():
    torch.manual_seed(0)
    logits, index = torch.randn(6, 2, 5), torch.randint(0, 5, (6, 2))
    expected = torch.distributions.Categorical(logits=logits).log_prob(index).sum(-1)
    one_hot = nn.functional.one_hot(index, 5).float()
    torch.testing.assert_close(row_log_likelihood(logits, index, "categorical", 1.0), expected)
    torch.testing.assert_close(row_log_likelihood(logits, one_hot, "categorical", 1.0), expected)


def _nll_model() -> tuple[MVTCAE, MultimodalBatch]:
    torch.manual_seed(0)
    cfg = MVTCAEConfig(
        n_modalities=3,
        latent_dim=3,
        input_dims={"x": (6,), "y": (4,), "w": (2, 3)},
        decoders_dist={"x": "normal", "y": "bernoulli", "w": "laplace"},
        decoder_dist_params={"x": {"scale": 0.5}, "w": {"scale": 0.8}},
    )
    model = MVTCAE(cfg).eval()
    batch = MultimodalBatch(
        data={
            "x": torch.randn(7, 6),
            "y": (torch.rand(7, 4) > 0.5).float(),
            "w": torch.rand(7, 2, 3),
        }
    )
    return model, batch


@pytest.mark.parametrize("masked", [False, True])
def test_subset_proposal_nll_with_every_modality_is_the_models_joint_nll(masked):
    model, batch = _nll_model()
    if masked:
        batch.masks = {
            "x": torch.tensor([True, False, True, True, True, False, True]),
            "y": torch.ones(7, dtype=torch.bool),
            "w": torch.tensor([True, True, False, True, True, True, False]),
        }
    torch.manual_seed(5)
    ours = subset_proposal_nll(model, batch, ["x", "y", "w"], K=40, batch_size_K=15)
    torch.manual_seed(5)
    theirs = model.compute_joint_nll(batch, K=40, batch_size_K=15)
    torch.testing.assert_close(ours.sum(), theirs, rtol=1e-5, atol=1e-4)


def test_subset_proposal_nll_estimates_the_same_likelihood_from_any_proposal():
    model, batch = _nll_model()
    torch.manual_seed(1)
    joint = subset_proposal_nll(model, batch, ["x", "y", "w"], K=4000, batch_size_K=500)
    single = subset_proposal_nll(model, batch, ["y"], K=4000, batch_size_K=500)
    assert torch.isfinite(single).all()
    # Both estimate −log p(X); a worse proposal only adds variance and (upward) bias.
    assert float((single - joint).mean()) > -0.5
    assert math.isclose(float(single.mean()), float(joint.mean()), rel_tol=0.15)


def test_display_conversion_of_image_layouts():
    from mvtcae.plots import to_display

    assert to_display(np.zeros((2, 3, 5, 6))).shape == (2, 5, 6, 3)
    assert to_display(np.zeros((2, 1, 5, 6))).shape == (2, 5, 6)
    stretched = to_display(np.array([[[[-1.0, 3.0]]]]))  # out of [0, 1]: rescaled, not clipped
    np.testing.assert_allclose(stretched, [[[0.0, 1.0]]])


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_latent_projection_png(method, tmp_path):
    from mvtcae.plots import project_2d, save_latent_projection

    rng = np.random.default_rng(0)
    z, labels = rng.normal(size=(40, 5)), rng.integers(0, 3, 40)
    assert project_2d(z, method).shape == (40, 2)
    path = save_latent_projection(z, labels, tmp_path / f"{method}.png", method)
    assert path.read_bytes()[:4] == b"\x89PNG"
