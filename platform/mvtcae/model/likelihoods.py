"""Decoder log-likelihoods, summed per row over each modality's event dimensions.

Each function takes the decoder output of shape (*lead, *event), a target that broadcasts
against it (e.g. (n, *event) against (k, n, *event)) and ``lead``; it returns (*lead,). With
``inplace=True`` it may overwrite ``output`` (a temporary that needs no gradient), which keeps
the large tensors to a single element-wise pass before the reduction.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class RowLogProb(Protocol):
    def __call__(
        self, output: Tensor, target: Tensor, lead: int, inplace: bool = False
    ) -> Tensor: ...


def _flat_events(t: Tensor, lead: int) -> Tensor:
    return t.reshape(*t.shape[:lead], -1)


def _difference(output: Tensor, target: Tensor, lead: int, inplace: bool) -> Tensor:
    diff = output.sub_(target) if inplace else output - target
    return _flat_events(diff, lead)


def normal_log_prob(scale: float) -> RowLogProb:
    """Σ log N(target; mean=output, scale) over the event dims."""
    log_norm = math.log(scale) + 0.5 * math.log(2 * math.pi)

    def log_prob(output: Tensor, target: Tensor, lead: int, inplace: bool = False) -> Tensor:
        size = math.prod(output.shape[lead:])
        diff = _difference(output, target, lead, inplace)
        sq = torch.einsum("...i,...i->...", diff, diff)
        return sq / (-2 * scale**2) - size * log_norm

    return log_prob


def laplace_log_prob(scale: float) -> RowLogProb:
    """Σ log Laplace(target; loc=output, scale) over the event dims."""
    log_norm = math.log(2 * scale)

    def log_prob(output: Tensor, target: Tensor, lead: int, inplace: bool = False) -> Tensor:
        size = math.prod(output.shape[lead:])
        diff = _difference(output, target, lead, inplace)
        return torch.linalg.vector_norm(diff, ord=1, dim=-1) / (-scale) - size * log_norm

    return log_prob


def bernoulli_log_prob(output: Tensor, target: Tensor, lead: int, inplace: bool = False) -> Tensor:
    """Σ log Bernoulli(target; logits=output) over the event dims."""
    bce = F.binary_cross_entropy_with_logits(output, target.expand_as(output), reduction="none")
    return -_flat_events(bce, lead).sum(-1)


def categorical_log_prob(
    output: Tensor, target: Tensor, lead: int, inplace: bool = False
) -> Tensor:
    """Σ log-softmax(output) against a one-hot float target or integer class indices."""
    log_p = torch.log_softmax(output, dim=-1)
    if target.is_floating_point():
        if target.shape[-1] != output.shape[-1]:
            raise ValueError(
                f"categorical one-hot target of shape {tuple(target.shape)} does not match the "
                f"decoder output {tuple(output.shape)} in its last (class) dimension"
            )
        return _flat_events(target.expand_as(output) * log_p, lead).sum(-1)
    index = target.long().expand(output.shape[:-1]).unsqueeze(-1)
    return _flat_events(log_p.gather(-1, index).squeeze(-1), lead).sum(-1)


def make_log_prob(distribution: str, scale: float = 1.0) -> RowLogProb:
    """The per-row log-likelihood function of a decoder distribution."""
    if distribution == "normal":
        return normal_log_prob(scale)
    if distribution == "laplace":
        return laplace_log_prob(scale)
    if distribution == "bernoulli":
        return bernoulli_log_prob
    if distribution == "categorical":
        return categorical_log_prob
    raise ValueError(f"unknown decoder distribution {distribution!r}")


def decoder_mean(output: Tensor, distribution: str) -> Tensor:
    """Mean of a decoder distribution from the decoder's raw output."""
    if distribution == "bernoulli":
        return torch.sigmoid(output)
    if distribution == "categorical":
        return torch.softmax(output, dim=-1)
    return output
