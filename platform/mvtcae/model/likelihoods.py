"""Per-element log-likelihoods of the decoder distributions."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LogProb = Callable[[Tensor, Tensor], Tensor]


def normal_log_prob(scale: float) -> LogProb:
    """log N(target; mean=output, scale) element-wise."""
    log_norm = math.log(scale) + 0.5 * math.log(2 * math.pi)

    def log_prob(output: Tensor, target: Tensor) -> Tensor:
        return -((target - output) ** 2) / (2 * scale**2) - log_norm

    return log_prob


def laplace_log_prob(scale: float) -> LogProb:
    """log Laplace(target; loc=output, scale) element-wise."""
    log_norm = math.log(2 * scale)

    def log_prob(output: Tensor, target: Tensor) -> Tensor:
        return -torch.abs(target - output) / scale - log_norm

    return log_prob


def bernoulli_log_prob(output: Tensor, target: Tensor) -> Tensor:
    """log Bernoulli(target; logits=output) element-wise."""
    return -F.binary_cross_entropy_with_logits(output, target, reduction="none")


def categorical_log_prob(output: Tensor, target: Tensor) -> Tensor:
    """log-softmax of the output's last dim against a one-hot target (same shape) or indices."""
    log_p = torch.log_softmax(output, dim=-1)
    if target.shape == output.shape:
        return target * log_p
    if target.shape == output.shape[:-1]:
        return log_p.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    raise ValueError(
        f"categorical target of shape {tuple(target.shape)} fits neither the decoder output "
        f"{tuple(output.shape)} (one-hot) nor its leading dims (class indices)"
    )


def make_log_prob(distribution: str, scale: float = 1.0) -> LogProb:
    """The element-wise log-likelihood function of a decoder distribution."""
    if distribution == "normal":
        return normal_log_prob(scale)
    if distribution == "laplace":
        return laplace_log_prob(scale)
    if distribution == "bernoulli":
        return bernoulli_log_prob
    if distribution == "categorical":
        return categorical_log_prob
    raise ValueError(f"unknown decoder distribution {distribution!r}")
