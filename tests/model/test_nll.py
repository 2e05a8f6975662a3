"""compute_joint_nll against the exact likelihood of a linear-Gaussian model and a row loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from handset import LinearDecoder, LinearGaussianEncoder
from scipy import stats

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig

SHAPES = {"a": (3,), "b": (2,)}
SCALES = {"a": 0.6, "b": 0.9}
D = 2


def linear_gaussian_model() -> MVTCAE:
    cfg = MVTCAEConfig(
        n_modalities=2,
        latent_dim=D,
        input_dims=SHAPES,
        decoders_dist={"a": "normal", "b": "normal"},
        decoder_dist_params={m: {"scale": s} for m, s in SCALES.items()},
    )
    enc = {m: LinearGaussianEncoder(s[0], D, seed=i) for i, (m, s) in enumerate(SHAPES.items())}
    dec = {m: LinearDecoder(D, s, seed=5 + i) for i, (m, s) in enumerate(SHAPES.items())}
    for e in enc.values():  # a rough but reasonable proposal
        with torch.no_grad():
            e.A.mul_(0.3)
            e.B.mul_(0.1)
    return MVTCAE(cfg, enc, dec)


def exact_log_marginal(model: MVTCAE, x: dict[str, np.ndarray], mods: list[str]) -> np.ndarray:
    """log p(x_mods) with z ~ N(0, I) and x_m = z C_m + c_m + noise: a Gaussian in closed form."""
    C = np.concatenate([model.decoders[m].C.detach().numpy() for m in mods], axis=1)
    c = np.concatenate([model.decoders[m].c.detach().numpy() for m in mods])
    noise = np.concatenate([np.full(SHAPES[m][0], SCALES[m] ** 2) for m in mods])
    cov = C.T @ C + np.diag(noise)
    obs = np.concatenate([x[m] for m in mods], axis=1)
    return stats.multivariate_normal(mean=c, cov=cov).logpdf(obs)


def sample_data(model: MVTCAE, n: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    z = g.normal(size=(n, D))
    return {
        m: z @ model.decoders[m].C.detach().numpy()
        + model.decoders[m].c.detach().numpy()
        + SCALES[m] * g.normal(size=(n, SHAPES[m][0]))
        for m in SHAPES
    }


def test_nll_converges_to_exact_log_likelihood():
    model = linear_gaussian_model()
    x = sample_data(model, 5, seed=0)
    batch = MultimodalBatch(data={m: torch.tensor(v) for m, v in x.items()})
    exact = -exact_log_marginal(model, x, ["a", "b"]).sum()
    errors = {}
    for K in (3, 20000):
        torch.manual_seed(0)
        errors[K] = abs(model.compute_joint_nll(batch, K=K, batch_size_K=1000).item() - exact)
    assert errors[20000] < 0.01 * 5  # under 0.01 nats per row
    assert errors[20000] < errors[3]


def test_masked_nll_is_the_likelihood_of_observed_modalities():
    model = linear_gaussian_model()
    x = sample_data(model, 6, seed=1)
    masks = {"a": np.array([1, 1, 0, 1, 0, 1], bool), "b": np.array([1, 0, 1, 1, 1, 0], bool)}
    data = {m: torch.tensor(np.where(masks[m][:, None], v, 0.0)) for m, v in x.items()}
    batch = MultimodalBatch(data=data, masks={m: torch.tensor(v) for m, v in masks.items()})
    exact = 0.0
    for row in range(6):
        mods = [m for m in SHAPES if masks[m][row]]
        exact -= exact_log_marginal(model, {m: x[m][row : row + 1] for m in mods}, mods).sum()
    torch.manual_seed(0)
    estimate = model.compute_joint_nll(batch, K=200_000, batch_size_K=20_000).item()
    assert estimate == pytest.approx(exact, abs=0.1)  # seeds spread about ±0.03


def per_row_reference(model: MVTCAE, batch: MultimodalBatch, K: int) -> float:
    """multivae's algorithm: one (K, n, d) draw, then a Python loop over rows."""
    mu, logvar = model.joint_posterior(batch)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z_all = q.rsample([K]).permute(1, 0, 2)
    total = 0.0
    for i in range(len(batch)):
        z = z_all[i]
        lpx = 0.0
        for m in model.modalities:
            out = model.decoders[m](z)
            lpx = lpx + torch.distributions.Normal(out, SCALES[m]).log_prob(batch.data[m][i]).sum(
                -1
            )
        lpz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        lqz = torch.distributions.Normal(mu[i], torch.exp(0.5 * logvar[i])).log_prob(z).sum(-1)
        total += (torch.logsumexp(lpx + lpz - lqz, 0) - math.log(K)).item()
    return -total


@pytest.mark.parametrize("batch_size_K", [7, 100, 250])
def test_vectorised_nll_equals_per_row_loop_with_same_seed(batch_size_K):
    model = linear_gaussian_model()
    x = sample_data(model, 4, seed=2)
    batch = MultimodalBatch(data={m: torch.tensor(v) for m, v in x.items()})
    torch.manual_seed(7)
    fast = model.compute_joint_nll(batch, K=250, batch_size_K=batch_size_K).item()
    torch.manual_seed(7)
    with torch.no_grad():
        slow = per_row_reference(model, batch, K=250)
    assert fast == pytest.approx(slow, rel=1e-10)


def test_nll_runs_in_eval_mode_without_grad_and_restores_mode():
    model = linear_gaussian_model().train()
    batch = MultimodalBatch(data={m: torch.tensor(v) for m, v in sample_data(model, 2, 3).items()})
    value = model.compute_joint_nll(batch, K=10, batch_size_K=4)
    assert value.dim() == 0 and not value.requires_grad
    assert model.training


@pytest.mark.parametrize("proposal", [["a"], ["b"]])
def test_a_subset_proposal_estimates_the_same_exact_likelihood(proposal):
    model = linear_gaussian_model()
    x = sample_data(model, 5, seed=4)
    batch = MultimodalBatch(data={m: torch.tensor(v) for m, v in x.items()})
    exact = -exact_log_marginal(model, x, ["a", "b"]).sum()
    torch.manual_seed(0)
    estimate = model.compute_joint_nll(batch, K=100_000, batch_size_K=10_000, proposal=proposal)
    # A one-modality proposal is wider than the joint posterior: unbiased in the limit, noisier.
    assert estimate.item() == pytest.approx(exact, abs=0.05 * 5)


def test_subset_proposal_with_a_per_row_loop_reference():
    model = linear_gaussian_model()
    batch = MultimodalBatch(data={m: torch.tensor(v) for m, v in sample_data(model, 3, 5).items()})
    torch.manual_seed(3)
    fast = model.compute_joint_nll(batch, K=300, batch_size_K=70, proposal=["b"]).item()
    torch.manual_seed(3)
    mu, logvar = model.joint_posterior(batch, ["b"])
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    z_all = q.rsample([300]).permute(1, 0, 2)
    slow = 0.0
    with torch.no_grad():
        for i in range(len(batch)):
            z = z_all[i]
            lpx = sum(
                torch.distributions.Normal(model.decoders[m](z), SCALES[m])
                .log_prob(batch.data[m][i])
                .sum(-1)
                for m in model.modalities
            )
            lpz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            lqz = torch.distributions.Normal(mu[i], torch.exp(0.5 * logvar[i])).log_prob(z).sum(-1)
            slow -= (torch.logsumexp(lpx + lpz - lqz, 0) - math.log(300)).item()
    assert fast == pytest.approx(slow, rel=1e-10)


def test_proposal_all_is_the_default_and_an_absent_proposal_is_refused():
    model = linear_gaussian_model()
    batch = MultimodalBatch(
        data={m: torch.tensor(v) for m, v in sample_data(model, 3, 6).items()},
        masks={"a": torch.tensor([True, False, True]), "b": torch.ones(3, dtype=torch.bool)},
    )
    torch.manual_seed(1)
    default = model.compute_joint_nll(batch, K=50, batch_size_K=20)
    torch.manual_seed(1)
    explicit = model.compute_joint_nll(batch, K=50, batch_size_K=20, proposal="all")
    assert default.item() == explicit.item()
    with pytest.raises(ValueError, match="1 rows have none of the proposal modalities"):
        model.compute_joint_nll(batch, K=5, proposal=["a"])
