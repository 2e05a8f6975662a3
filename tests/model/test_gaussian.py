"""Product of experts and KL terms against closed forms and Monte Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from mvtcae.model.gaussian import kl_between, kl_to_standard_normal, product_of_experts


def test_poe_is_the_normalised_product_of_densities():
    g = torch.Generator().manual_seed(0)
    mus = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    logvars = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    mu_j, logvar_j = product_of_experts(mus, logvars)
    # Σ_m log N(x; mu_m, v_m) − log N(x; mu_J, v_J) is the same for every x exactly when the
    # joint is the normalised product; check at many points.
    xs = np.linspace(-3, 3, 25)
    for row in range(4):
        for dim in range(2):
            sd = [math.sqrt(math.exp(logvars[m, row, dim]) + 1e-8) for m in range(3)]
            log_prod = sum(stats.norm.logpdf(xs, mus[m, row, dim].item(), sd[m]) for m in range(3))
            log_joint = stats.norm.logpdf(
                xs, mu_j[row, dim].item(), math.exp(0.5 * logvar_j[row, dim].item())
            )
            gap = log_prod - log_joint
            assert np.ptp(gap) < 1e-9


def test_poe_drops_absent_experts():
    g = torch.Generator().manual_seed(1)
    mus = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    logvars = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    present = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    mu_j, logvar_j = product_of_experts(mus, logvars, present)
    for row in range(5):
        keep = present[:, row]
        sub_mu, sub_lv = product_of_experts(mus[keep, row : row + 1], logvars[keep, row : row + 1])
        torch.testing.assert_close(mu_j[row], sub_mu[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(logvar_j[row], sub_lv[0], rtol=1e-12, atol=1e-12)


def test_single_expert_is_itself_up_to_epsilon():
    mu = torch.tensor([[[0.3, -1.2]]], dtype=torch.float64)
    logvar = torch.tensor([[[0.5, -2.0]]], dtype=torch.float64)
    mu_j, logvar_j = product_of_experts(mu, logvar)
    torch.testing.assert_close(mu_j, mu[0])
    torch.testing.assert_close(logvar_j, torch.log(torch.exp(logvar[0]) + 1e-8))


def _mc_kl(q: torch.distributions.Normal, p: torch.distributions.Normal, n: int = 400_000):
    z = q.sample((n,))
    diff = (q.log_prob(z) - p.log_prob(z)).sum(-1)
    return diff.mean(0), diff.std(0) / math.sqrt(n)


def test_joint_kl_matches_monte_carlo():
    torch.manual_seed(2)
    mu, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    estimate, se = _mc_kl(q, p)
    exact = kl_to_standard_normal(mu, logvar)
    assert (exact - estimate).abs().max() < 5 * se.max()


def test_modality_kl_matches_monte_carlo():
    torch.manual_seed(3)
    mq, lq = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64) - 1
    mp, lp = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    q = torch.distributions.Normal(mq, torch.exp(0.5 * lq))
    p = torch.distributions.Normal(mp, torch.exp(0.5 * lp))
    estimate, se = _mc_kl(q, p)
    exact = kl_between(mq, lq, mp, lp)
    assert (exact - estimate).abs().max() < 5 * se.max()
    torch.testing.assert_close(exact, torch.distributions.kl_divergence(q, p).sum(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_is_zero_for_identical_gaussians(dtype):
    mu, lv = torch.randn(5, 3, dtype=dtype), torch.randn(5, 3, dtype=dtype)
    assert kl_between(mu, lv, mu, lv).abs().max() < 1e-6
