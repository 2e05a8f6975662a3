"""The MVTCAE loss against an independent NumPy/SciPy computation on hand-set networks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from handset import LinearDecoder, LinearGaussianEncoder, reference_loss

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig

SHAPES = {"img": (2, 3), "vec": (4,), "tok": (3, 5)}
D = 3
N = 7


def make_data(dist: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    data = {}
    for m, shape in SHAPES.items():
        if dist == "bernoulli":
            data[m] = rng.integers(0, 2, (N, *shape)).astype(np.float64)
        elif dist == "categorical":
            idx = rng.integers(0, shape[-1], (N, *shape[:-1]))
            data[m] = np.eye(shape[-1])[idx]
        else:
            data[m] = rng.normal(0, 1, (N, *shape))
    return data


def build_model(dist: str, rescale: bool, alpha: float, beta: float) -> MVTCAE:
    scales = {"img": 0.75, "vec": 1.3, "tok": 1.0}
    cfg = MVTCAEConfig(
        n_modalities=len(SHAPES),
        latent_dim=D,
        input_dims=SHAPES,
        uses_likelihood_rescaling=rescale,
        decoders_dist={m: dist for m in SHAPES},
        decoder_dist_params={m: {"scale": s} for m, s in scales.items()}
        if dist in ("normal", "laplace")
        else None,
        alpha=alpha,
        beta=beta,
    )
    encoders = {
        m: LinearGaussianEncoder(int(np.prod(s)), D, seed=i)
        for i, (m, s) in enumerate(SHAPES.items())
    }
    decoders = {m: LinearDecoder(D, s, seed=10 + i) for i, (m, s) in enumerate(SHAPES.items())}
    return MVTCAE(cfg, encoders, decoders)


@pytest.mark.parametrize("dist", ["normal", "laplace", "bernoulli", "categorical"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("rescale", [False, True])
def test_loss_matches_independent_computation(dist, masked, rescale):
    rng = np.random.default_rng(0)
    alpha, beta = 0.3, 1.7
    model = build_model(dist, rescale, alpha, beta)
    data = make_data(dist, rng)
    masks = None
    if masked:
        masks = {m: rng.random(N) > 0.4 for m in SHAPES}
        masks["vec"][~(masks["img"] | masks["tok"])] = True  # every row keeps one modality
        for m in SHAPES:
            data[m][~masks[m]] = 0.0
    batch = MultimodalBatch(
        data={m: torch.tensor(x) for m, x in data.items()},
        masks=None if masks is None else {m: torch.tensor(v) for m, v in masks.items()},
    )

    torch.manual_seed(123)
    out = model(batch)
    # multivae draws ε through torch.distributions with the global generator: replay it.
    torch.manual_seed(123)
    eps = torch.distributions.Normal(torch.zeros(N, D, dtype=torch.float64), 1.0).rsample().numpy()

    sizes = {m: np.prod(s) for m, s in SHAPES.items()}
    factors = {m: (max(sizes.values()) / sizes[m] if rescale else 1.0) for m in SHAPES}
    scales = {m: model.model_config.scale(m) for m in SHAPES}
    expected_sum, expected = reference_loss(
        model.encoders,
        model.decoders,
        data,
        masks,
        eps,
        {m: dist for m in SHAPES},
        scales,
        factors,
        alpha,
        beta,
    )
    assert out.loss_sum.item() == pytest.approx(expected_sum, rel=1e-10)
    assert out.loss.item() == pytest.approx(expected_sum / N, rel=1e-10)
    assert set(out.metrics) == set(expected)
    for key, value in expected.items():
        assert out.metrics[key].item() == pytest.approx(value, rel=1e-9, abs=1e-9), key
        assert not out.metrics[key].requires_grad


def test_rescale_factors_ignored_when_rescaling_off():
    with pytest.warns(UserWarning, match="uses_likelihood_rescaling is False"):
        cfg = MVTCAEConfig(
            n_modalities=2, input_dims={"a": (4,), "b": (2,)}, rescale_factors={"a": 3.0, "b": 5.0}
        )
    assert MVTCAE(cfg).rescale_factors == {"a": 1.0, "b": 1.0}


def test_default_rescale_factors_are_size_ratios():
    cfg = MVTCAEConfig(
        n_modalities=2, input_dims={"a": (3, 4, 4), "b": (6,)}, uses_likelihood_rescaling=True
    )
    assert MVTCAE(cfg).rescale_factors == {"a": 1.0, "b": 8.0}


def test_loss_backpropagates_and_counts_every_row():
    model = build_model("normal", False, 0.5, 1.0)
    rng = np.random.default_rng(1)
    data = {m: torch.tensor(x) for m, x in make_data("normal", rng).items()}
    torch.manual_seed(0)
    out = model(MultimodalBatch(data=data))
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
