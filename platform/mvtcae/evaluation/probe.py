"""The linear probe: how well the posterior means given k modalities separate the labels."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from mvtcae.config.evaluation import EvaluationSection
from mvtcae.evaluation.progress import progress
from mvtcae.evaluation.split import EvalSplit, nanmean, subsets_of_size
from mvtcae.model.gaussian import product_of_experts

if TYPE_CHECKING:
    from mvtcae import MVTCAE


@torch.no_grad()
def expert_table(
    model: MVTCAE, split: EvalSplit, batch_size: int, device: str | torch.device
) -> tuple[Tensor, Tensor]:
    """Every modality's expert (mean, log-variance) for every row of ``split``: (M, n, d) each,
    float32 on the CPU, modalities in the model's order. Rows where a modality is absent hold
    values no subset uses (`subset_means` reads only rows where the whole subset is present)."""
    mods = model.modalities
    mus, logvars = [], []
    for start in range(0, len(split), batch_size):
        rows = np.arange(start, min(start + batch_size, len(split)))
        mu, logvar, _ = model.experts(split.batch(rows, mods, device), mods)
        mus.append(mu.float().cpu())
        logvars.append(logvar.float().cpu())
    if not mus:
        empty = torch.zeros((len(mods), 0, model.latent_dim))
        return empty, empty.clone()
    return torch.cat(mus, dim=1), torch.cat(logvars, dim=1)


def subset_means(
    table: tuple[Tensor, Tensor], modalities: Sequence[str], subset: Sequence[str], rows: np.ndarray
) -> np.ndarray:
    """Posterior means given ``subset`` for ``rows`` (where all of it is present), (len(rows), d):
    the product of the subset's experts from `expert_table`, as `MVTCAE.encode` computes it."""
    index = torch.as_tensor([list(modalities).index(m) for m in subset])
    rows_t = torch.as_tensor(rows, dtype=torch.long)
    mus, logvars = table
    mean, _ = product_of_experts(mus[index][:, rows_t], logvars[index][:, rows_t])
    return mean.numpy()


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
    # Each modality's expert is encoded once per split; a subset's posterior is then only the
    # product of its experts (63 subsets of mfeat: 6 encoder passes per split, not 192).
    train_table = expert_table(model, train, cfg.batch_size, device)
    test_table = expert_table(model, test, cfg.batch_size, device)
    for k, subset in progress(jobs, "latent probe"):
        train_rows, test_rows = train.rows_with(subset), test.rows_with(subset)
        acc = linear_probe_accuracy(
            subset_means(train_table, mods, subset, train_rows),
            train.labels[train_rows],
            subset_means(test_table, mods, subset, test_rows),
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
