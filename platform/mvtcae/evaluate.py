"""Evaluation of a trained MVTCAE: the MVTCAE/MoPoE papers' measures, plus plots.

Every measure is reported per number k of conditioning modalities, averaged over the subsets of
that size (all of them, or a seeded sample of ``max_subsets_per_size``):

- ``eval/latent_acc_<k>``: linear probe (logistic regression on posterior means of a training
  subsample) tested on posterior means of the evaluated split, k = 1..M;
- ``eval/coherence_<k>``: the remaining modalities generated from the k conditioning ones, judged
  by per-modality classifiers that the platform trains on the training split (cached per dataset
  checksum; their own test accuracy is ``eval/classifier_acc_<m>``), k = 1..M-1;
- ``eval/latent_acc_mean`` and ``eval/coherence_mean``: the means over k (one number to
  promote on);
- ``eval/joint_nll``: −log p(X) per sample (importance-weighted, joint posterior proposal), and
  ``eval/joint_nll_<k>`` with the k-subsets' posteriors as proposals (as in MoPoE).

Rows missing a modality that a measure needs are left out of that measure.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import torch

    from mvtcae import MVTCAE

logger = logging.getLogger(__name__)


class EvalConfig(BaseModel):
    """Which measures to compute and how much data and compute to spend on each."""

    model_config = ConfigDict(extra="forbid")

    latent_accuracy: bool = True
    coherence: bool = True
    joint_nll: bool = True
    plots: bool = True
    max_samples: int | None = Field(default=2000, ge=1, description="rows of the evaluated split")
    max_subsets_per_size: int | None = Field(
        default=None, ge=1, description="subsets sampled per size k; None: all of them"
    )
    batch_size: int = Field(default=256, ge=1)
    seed: int = 0
    probe_train_samples: int = Field(default=5000, ge=10)
    probe_max_iter: int = Field(default=1000, ge=10)
    coherence_from_mean: bool = Field(
        default=False, description="generate from the posterior mean instead of a sample"
    )
    classifier_epochs: int = Field(default=20, ge=1)
    classifier_batch_size: int = Field(default=64, ge=1)
    classifier_lr: float = Field(default=2e-3, gt=0)
    classifier_train_samples: int | None = Field(default=None, ge=10)
    classifier_cache_dir: Path | None = Field(
        default=None,
        description="None: $MVTCAE_CACHE_DIR/classifiers or ~/.cache/mvtcae/classifiers",
    )
    nll_K: int = Field(
        default=1000, ge=1,
        description="importance samples per row: the joint NLL costs nll_max_samples x nll_K x M "
        "decoder passes",
    )  # fmt: skip
    nll_batch_size_K: int = Field(default=100, ge=1, description="samples per vectorised step")
    nll_max_samples: int = Field(default=100, ge=1, description="rows of the likelihood estimates")
    nll_subsets_per_size: int | None = Field(
        default=1, ge=0,
        description="subset proposals per size k for joint_nll_<k> (0 disables): each costs as "
        "much as the joint NLL, M subsets at 1 per size",
    )  # fmt: skip
    grid_samples: int = Field(default=8, ge=1)
    projection: Literal["pca", "tsne"] = "pca"
    projection_samples: int = Field(default=1000, ge=10)

    @field_validator("classifier_cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: Path | None) -> Path | None:
        # Ray tasks run in their own session directories: resolve once, where the config is built.
        return None if value is None else Path(value).expanduser().resolve()


@dataclass
class EvalReport:
    """Flat metrics (``eval/...``), plot paths and per-subset details of one evaluation."""

    metrics: dict[str, float] = field(default_factory=dict)
    plots: dict[str, Path] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: NaN becomes None, paths become strings."""
        clean = {k: (v if math.isfinite(v) else None) for k, v in self.metrics.items()}
        return {
            "metrics": clean,
            "plots": {k: str(p) for k, p in self.plots.items()},
            "details": self.details,
        }

    def save_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as indented JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        return path


# ----------------------------------------------------------------------------- cost


def _subsets(m: int, k: int, limit: int | None) -> int:
    count = math.comb(m, k)
    return count if limit is None else min(count, limit)


def evaluation_cost(cfg: EvalConfig, modalities: int, rows: int) -> dict[str, int]:
    """What an evaluation will compute, in network passes per sample (the cost is about
    proportional): decoder passes for coherence and the likelihoods, encoder passes for the
    probe. ``rows`` is the number of evaluated rows (at most ``max_samples``)."""
    m, limit = modalities, cfg.max_subsets_per_size
    cost: dict[str, int] = {}
    if cfg.coherence and m > 1:
        cost["coherence decoder passes"] = rows * sum(
            _subsets(m, k, limit) * (m - k) for k in range(1, m)
        )
    if cfg.latent_accuracy:
        probe_rows = cfg.probe_train_samples + rows
        cost["probe encoder passes"] = probe_rows * sum(
            _subsets(m, k, limit) * k for k in range(1, m + 1)
        )
    if cfg.joint_nll:
        nll_rows = min(rows, cfg.nll_max_samples)
        per_estimate = nll_rows * cfg.nll_K * m
        subsets = sum(_subsets(m, k, cfg.nll_subsets_per_size or 0) for k in range(1, m + 1))
        cost["joint NLL decoder passes"] = per_estimate
        if subsets:
            cost["subset NLL decoder passes"] = per_estimate * subsets
    return cost


# ----------------------------------------------------------------------------- entry point


def evaluate(
    model: MVTCAE,
    dataset_dir: str | Path,
    cfg: EvalConfig | None = None,
    *,
    split: str = "test",
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
) -> EvalReport:
    """Evaluate ``model`` on a split of the dataset; write evaluation.json and plots to out_dir."""
    import torch

    from mvtcae import measures

    cfg = cfg or EvalConfig()
    device = torch.device(device)
    model = model.to(device).eval()
    test = measures.load_eval_split(dataset_dir, split, cfg.max_samples, cfg.seed)
    measures.check_modalities(model, test, dataset_dir)
    cost = evaluation_cost(cfg, len(model.modalities), len(test))
    logger.info("evaluation on %d %s rows: %s", len(test), split,
                ", ".join(f"{k} {v:,}" for k, v in cost.items()))  # fmt: skip
    report = EvalReport(
        details={
            "split": split,
            "rows": len(test),
            "config": cfg.model_dump(mode="json"),
            "cost": cost,
        }  # fmt: skip
    )
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        measures.labelled_measures(model, dataset_dir, test, cfg, device, report)
        if cfg.joint_nll:
            torch.manual_seed(cfg.seed)
            metrics, details = measures.joint_nll(model, test, cfg, device)
            report.metrics.update(metrics)
            report.details["joint_nll_by_subset"] = details
        if cfg.plots and out_dir is not None:
            report.plots = measures.make_plots(model, test, cfg, Path(out_dir) / "plots", device)
            trend = _trend_plot(report.metrics, dataset_dir, Path(out_dir) / "plots")
            if trend is not None:
                report.plots["trend"] = trend
    if out_dir is not None:
        report.save_json(Path(out_dir) / "evaluation.json")
    return report


def _trend_plot(metrics: dict[str, float], dataset_dir: str | Path, plots_dir: Path) -> Path | None:
    """The coherence / latent-probe trend by number of conditioning modalities."""
    from mvtcae.data import load_manifest
    from mvtcae.plots import save_trend_plot

    manifest = load_manifest(dataset_dir)
    title = f"{manifest.name}: by number of conditioning modalities"
    return save_trend_plot(metrics, manifest.num_classes, plots_dir / "trend.png", title)
