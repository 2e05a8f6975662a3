"""The linear probe: how well the posterior means given k modalities separate the labels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from mvtcae.config.evaluation import EvaluationSection
from mvtcae.evaluation.progress import progress
from mvtcae.evaluation.split import EvalSplit, nanmean, subsets_of_size

if TYPE_CHECKING:
    from mvtcae import MVTCAE


@torch.no_grad()
def posterior_means(
    model: MVTCAE,
    split: EvalSplit,
    cond_mod: Sequence[str],
    rows: np.ndarray,
    batch_size: int,
    device: str | torch.device,
) -> np.ndarray:
    """Posterior means given ``cond_mod`` for the given rows, (len(rows), latent_dim)."""
    out = []
    for start in range(0, len(rows), batch_size):
        batch = split.batch(rows[start : start + batch_size], cond_mod, device)
        out.append(model.encode(batch, cond_mod=list(cond_mod), return_mean=True).z.float().cpu())
    if not out:
        return np.zeros((0, model.latent_dim), dtype=np.float32)
    return torch.cat(out).numpy()


def linear_probe_accuracy(
    train_z: np.ndarray,
    train_y: np.ndarray,
    test_z: np.ndarray,
    test_y: np.ndarray,
    max_iter: int = 1000,
    seed: int = 0,
) -> float:
    """Test accuracy of a logistic regression fitted on standardised training latents."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    if len(test_y) == 0 or len(np.unique(train_y)) < 2:
        return math.nan
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)
    )
    # One BLAS thread: the features are (rows x latent), too small to split, and BLAS threads
    # only fight torch's OpenMP threads for the cores (mfeat's 63 probes: 6.1 s with 2 of
    # each, 2.5 s with 1 BLAS thread). The result does not depend on the thread count.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", category=UserWarning)  # ConvergenceWarning on tiny sets
        probe.fit(train_z, train_y)
        predicted = probe.predict(test_z)
    return float((predicted == test_y).mean())


def latent_accuracy(
    model: MVTCAE,
    train: EvalSplit,
    test: EvalSplit,
    cfg: EvaluationSection,
    device: str | torch.device,
) -> tuple[dict[str, float], dict[str, float]]:
    """``eval/latent_acc_<k>`` for k = 1..M, and the accuracy of every subset evaluated."""
    rng = np.random.default_rng(cfg.seed)
    metrics, details = {}, {}
    mods = model.modalities
    jobs = [
        (k, s)
        for k in range(1, len(mods) + 1)
        for s in subsets_of_size(mods, k, cfg.max_subsets_per_size, rng)
    ]
    per_k: dict[int, list[float]] = {}
    for k, subset in progress(jobs, "latent probe"):
        train_rows, test_rows = train.rows_with(subset), test.rows_with(subset)
        acc = linear_probe_accuracy(
            posterior_means(model, train, subset, train_rows, cfg.batch_size, device),
            train.labels[train_rows],
            posterior_means(model, test, subset, test_rows, cfg.batch_size, device),
            test.labels[test_rows],
            cfg.probe_max_iter,
            cfg.seed,
        )
        details["+".join(subset)] = acc
        per_k.setdefault(k, []).append(acc)
    for k, values in per_k.items():
        metrics[f"eval/latent_acc_{k}"] = nanmean(values)
    metrics["eval/latent_acc_mean"] = nanmean(list(metrics.values()))
    return metrics, details
