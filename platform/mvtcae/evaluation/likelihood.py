"""Likelihood: the joint NLL and MoPoE's subset-proposal NLLs, through the model's one estimator
(`MVTCAE.compute_joint_nll` with ``proposal``)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from mvtcae.config.evaluation import EvaluationSection
from mvtcae.evaluation.progress import progress
from mvtcae.evaluation.split import EvalSplit, nanmean, subsets_of_size

if TYPE_CHECKING:
    from mvtcae import MVTCAE


def _nll_per_row(
    model: MVTCAE,
    split: EvalSplit,
    rows: np.ndarray,
    cfg: EvaluationSection,
    device: str | torch.device,
    proposal: str | list[str],
    desc: str,
) -> float:
    """−log p(X) per row over ``rows`` (mean), in batches of rows, proposed from ``proposal``."""
    row_batch = max(1, cfg.batch_size // 4)
    total = 0.0
    for start in progress(range(0, len(rows), row_batch), desc):
        batch = split.batch(rows[start : start + row_batch], device=device)
        total += float(
            model.compute_joint_nll(
                batch, K=cfg.nll_K, batch_size_K=cfg.nll_batch_size_K, proposal=proposal
            )
        )
    return total / len(rows) if len(rows) else math.nan


def joint_nll(
    model: MVTCAE, split: EvalSplit, cfg: EvaluationSection, device: str | torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """``eval/joint_nll`` per sample, and ``eval/joint_nll_<k>`` with k-subset proposals (the
    same likelihood, estimated from each k-subset's posterior, as in MoPoE)."""
    rows = np.arange(min(len(split), cfg.nll_max_samples))
    metrics = {"eval/joint_nll": _nll_per_row(model, split, rows, cfg, device, "all", "joint nll")}
    details: dict[str, float] = {}
    if not cfg.nll_subsets_per_size:
        return metrics, details
    rng = np.random.default_rng(cfg.seed + 2)
    mods = model.modalities
    for k in range(1, len(mods) + 1):
        values = []
        for subset in subsets_of_size(mods, k, cfg.nll_subsets_per_size, rng):
            subset_rows = np.intersect1d(rows, split.rows_with(subset))
            value = _nll_per_row(
                model,
                split,
                subset_rows,
                cfg,
                device,
                list(subset),
                f"nll given {'+'.join(subset)}",
            )
            details["+".join(subset)] = value
            values.append(value)
        metrics[f"eval/joint_nll_{k}"] = nanmean(values)
    return metrics, details
