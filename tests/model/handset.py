"""Tiny hand-set linear networks and a NumPy/SciPy re-computation of the MVTCAE loss.

The reference never calls the package's own maths: likelihoods come from SciPy, the product of
experts and KL terms are written out from their textbook definitions in NumPy.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import special, stats
from torch import nn


class LinearGaussianEncoder(nn.Module):
    """mu = x A + a, logvar = x B + b on the flattened input, with fixed weights."""

    def __init__(self, in_features: int, latent_dim: int, seed: int):
        super().__init__()
        g = np.random.default_rng(seed)
        self.A = nn.Parameter(torch.tensor(g.normal(0, 0.5, (in_features, latent_dim))))
        self.a = nn.Parameter(torch.tensor(g.normal(0, 0.3, latent_dim)))
        self.B = nn.Parameter(torch.tensor(g.normal(0, 0.2, (in_features, latent_dim))))
        self.b = nn.Parameter(torch.tensor(g.normal(0, 0.2, latent_dim)))

    def forward(self, x):
        flat = x.reshape(x.shape[0], -1)
        return flat @ self.A + self.a, flat @ self.B + self.b

    def numpy(self):
        return {k: v.detach().numpy() for k, v in self.named_parameters()}


class LinearDecoder(nn.Module):
    """out = z C + c reshaped to the modality's shape, with fixed weights."""

    def __init__(self, latent_dim: int, shape: tuple[int, ...], seed: int):
        super().__init__()
        g = np.random.default_rng(seed)
        size = int(np.prod(shape))
        self.shape = shape
        self.C = nn.Parameter(torch.tensor(g.normal(0, 0.7, (latent_dim, size))))
        self.c = nn.Parameter(torch.tensor(g.normal(0, 0.3, size)))

    def forward(self, z):
        return (z @ self.C + self.c).reshape(*z.shape[:-1], *self.shape)

    def numpy(self):
        return {k: v.detach().numpy() for k, v in self.named_parameters()}


def log_likelihood(dist: str, out: np.ndarray, x: np.ndarray, scale: float) -> np.ndarray:
    """Per-element log p(x | out) from SciPy's densities."""
    if dist == "normal":
        return stats.norm.logpdf(x, loc=out, scale=scale)
    if dist == "laplace":
        return stats.laplace.logpdf(x, loc=out, scale=scale)
    if dist == "bernoulli":
        p = special.expit(out)
        return x * np.log(p) + (1 - x) * np.log1p(-p)
    if dist == "categorical":
        return x * special.log_softmax(out, axis=-1)
    raise ValueError(dist)


def gaussian_kl(mq, vq, mp, vp):
    """KL(N(mq, vq) || N(mp, vp)) for diagonal Gaussians, summed over the last axis."""
    return 0.5 * np.sum(np.log(vp / vq) + (vq + (mq - mp) ** 2) / vp - 1.0, axis=-1)


def reference_loss(encoders, decoders, data, masks, eps, dists, scales, rescale, alpha, beta):
    """The MVTCAE loss terms recomputed from scratch; returns (loss_sum, metrics)."""
    mods = list(data)
    n = next(iter(data.values())).shape[0]
    M = len(mods)
    masks = masks or {m: np.ones(n, bool) for m in mods}
    mus, vars_ = {}, {}
    for m in mods:
        p = encoders[m].numpy()
        flat = data[m].reshape(n, -1)
        mus[m] = flat @ p["A"] + p["a"]
        vars_[m] = np.exp(flat @ p["B"] + p["b"])
    # product of Gaussian experts: precisions add, means are precision-weighted
    prec = sum(np.where(masks[m][:, None], 1.0 / (vars_[m] + 1e-8), 0.0) for m in mods)
    var_j = 1.0 / prec
    mu_j = var_j * sum(np.where(masks[m][:, None], mus[m] / (vars_[m] + 1e-8), 0.0) for m in mods)
    z = mu_j + np.sqrt(var_j) * eps
    metrics = {"joint_divergence": gaussian_kl(mu_j, var_j, 0.0, 1.0).sum()}
    for m in mods:
        p = decoders[m].numpy()
        out = (z @ p["C"] + p["c"]).reshape(data[m].shape)
        ll = log_likelihood(dists[m], out, data[m], scales[m]).reshape(n, -1).sum(-1)
        metrics[m] = np.sum(np.where(masks[m], -ll * rescale[m], 0.0))
        kl = gaussian_kl(mu_j, var_j, mus[m], vars_[m])
        metrics["kld_" + m] = np.sum(np.where(masks[m], kl, 0.0))
    rec = sum(metrics[m] for m in mods)
    kls = sum(metrics["kld_" + m] for m in mods)
    loss_sum = (M - alpha) / M * rec + beta * (
        alpha / M * kls + (1 - alpha) * metrics["joint_divergence"]
    )
    return loss_sum, metrics
