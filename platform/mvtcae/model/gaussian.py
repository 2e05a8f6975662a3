"""Closed forms for diagonal Gaussians: product of experts and KL divergences."""

from __future__ import annotations

import math

import torch
from torch import Tensor

POE_EPS = 1e-8


def product_of_experts(
    mus: Tensor, logvars: Tensor, present: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Joint (mu, logvar) of the experts along dim 0, without a prior expert.

    ``mus``/``logvars`` are (E, n, d) and ``present`` is a bool (E, n) or None (all present); an
    absent expert has precision exactly 0 and receives zero gradient. Every row needs one
    present expert.
    """
    if present is None:
        precision = 1.0 / (torch.exp(logvars) + POE_EPS)
        total = precision.sum(dim=0)
        return (mus * precision).sum(dim=0) / total, torch.log(1.0 / total)
    keep = present.unsqueeze(-1)
    # Absent experts read finite stand-ins so that neither value nor gradient can be NaN.
    safe_logvar = torch.where(keep, logvars, torch.zeros_like(logvars))
    safe_mu = torch.where(keep, mus, torch.zeros_like(mus))
    precision = torch.where(keep, 1.0 / (torch.exp(safe_logvar) + POE_EPS), 0.0)
    total = precision.sum(dim=0)
    joint_mu = (safe_mu * precision).sum(dim=0) / total
    joint_logvar = torch.log(1.0 / total)
    return joint_mu, joint_logvar


def kl_to_standard_normal(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the last dim."""
    return -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=-1)


def kl_between(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) summed over the last dim."""
    var_p = logvar_p.exp()
    terms = 1 - logvar_q.exp() / var_p - (mu_q - mu_p).pow(2) / var_p + logvar_q - logvar_p
    return -0.5 * terms.sum(dim=-1)


def log_normal(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim (broadcasting)."""
    return -0.5 * torch.sum((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi), dim=-1)


def log_standard_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over the last dim."""
    return -0.5 * torch.sum(z.pow(2) + math.log(2 * math.pi), dim=-1)
