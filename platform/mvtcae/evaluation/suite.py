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

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mvtcae import storage
from mvtcae.config.evaluation import EvaluationSection
from mvtcae.data import load_manifest
from mvtcae.evaluation.coherence import coherence, modality_classifiers, model_generator
from mvtcae.evaluation.likelihood import joint_nll
from mvtcae.evaluation.plots import make_plots, save_trend_plot
from mvtcae.evaluation.probe import latent_accuracy
from mvtcae.evaluation.report import EvalReport, evaluation_cost
from mvtcae.evaluation.split import EvalSplit, check_modalities, load_eval_split
from mvtcae.storage.checkpoints import (
    CHECKSUMS,
    MODEL_FILES,
    CorruptCheckpointError,
    load_model,
    verify_checkpoint,
)

if TYPE_CHECKING:
    from mvtcae import MVTCAE

logger = logging.getLogger(__name__)


def evaluate(
    model: MVTCAE,
    dataset_dir: str | Path,
    cfg: EvaluationSection | None = None,
    *,
    split: str = "test",
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
) -> EvalReport:
    """Evaluate ``model`` on a split of the dataset; write evaluation.json and plots to out_dir."""
    cfg = cfg or EvaluationSection()
    device = torch.device(device)
    model = model.to(device).eval()
    test = load_eval_split(dataset_dir, split, cfg.max_samples, cfg.seed)
    check_modalities(model, test, dataset_dir)
    cost = evaluation_cost(cfg, len(model.modalities), len(test))
    logger.info(
        "evaluation on %d %s rows: %s",
        len(test),
        split,
        ", ".join(f"{k} {v:,}" for k, v in cost.items()),
    )
    report = EvalReport(
        details={
            "split": split,
            "rows": len(test),
            "config": cfg.model_dump(mode="json"),
            "cost": cost,
        }
    )
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        labelled_measures(model, dataset_dir, test, cfg, device, report)
        if cfg.joint_nll:
            torch.manual_seed(cfg.seed)
            metrics, details = joint_nll(model, test, cfg, device)
            report.metrics.update(metrics)
            report.details["joint_nll_by_subset"] = details
        if cfg.plots and out_dir is not None:
            report.plots = make_plots(model, test, cfg, Path(out_dir) / "plots", device)
            trend = _trend_plot(report.metrics, dataset_dir, Path(out_dir) / "plots")
            if trend is not None:
                report.plots["trend"] = trend
    if out_dir is not None:
        report.save_json(Path(out_dir) / "evaluation.json")
    return report


def _trend_plot(metrics: dict[str, float], dataset_dir: str | Path, plots_dir: Path) -> Path | None:
    """The coherence / latent-probe trend by number of conditioning modalities."""
    manifest = load_manifest(dataset_dir)
    title = f"{manifest.name}: by number of conditioning modalities"
    return save_trend_plot(metrics, manifest.num_classes, plots_dir / "trend.png", title)


@dataclass
class CheckpointEvaluation:
    """What `evaluate_checkpoint` measured, and on which checkpoint."""

    report: EvalReport
    out_dir: str | None
    """The local directory the report and plots were written in (None without an output
    location); the paths in ``report.plots`` lie under it."""
    checkpoint: str
    """The storage location of the checkpoint evaluated (the first intact candidate)."""
    skipped: list[str] = field(default_factory=list)
    """A note on each corrupt candidate passed over."""


def evaluate_checkpoint(
    candidates: Sequence[str],
    dataset_dir: str,
    cfg: EvaluationSection | dict[str, Any],
    *,
    split: str = "test",
    out_location: str | None = None,
    threads: int | None = None,
) -> CheckpointEvaluation:
    """Evaluate the first intact checkpoint of ``candidates`` (storage locations, best first).

    The one way the platform evaluates a checkpoint, in a Ray task or in-process: model files
    are downloaded (never the optimizer state) and verified against the checkpoint's checksums;
    the report and plots go to ``out_location`` in run storage when given.
    """
    config = EvaluationSection.model_validate(cfg) if isinstance(cfg, dict) else cfg
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(max(1, threads))
    try:
        return _evaluate_first_intact(candidates, dataset_dir, config, split, out_location)
    finally:
        torch.set_num_threads(before)  # an in-process caller goes on with its own setting


def _evaluate_first_intact(
    candidates: Sequence[str],
    dataset_dir: str,
    config: EvaluationSection,
    split: str,
    out_location: str | None,
) -> CheckpointEvaluation:
    """`evaluate_checkpoint` with the thread count set."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skipped: list[str] = []
    for location in candidates:
        with storage.local_directory(location, files=(*MODEL_FILES, CHECKSUMS)) as checkpoint_dir:
            try:
                verify_checkpoint(checkpoint_dir, files=MODEL_FILES)
            except CorruptCheckpointError as err:
                skipped.append(f"{storage.basename(location)}: {err}")
                continue
            model = load_model(checkpoint_dir).to(device)
        if out_location is None:
            report = evaluate(model, dataset_dir, config, split=split, device=device)
            return CheckpointEvaluation(report, None, location, skipped)
        with storage.staged_directory(out_location) as out_dir:
            report = evaluate(
                model, dataset_dir, config, split=split, device=device, out_dir=out_dir
            )
        return CheckpointEvaluation(report, str(out_dir), location, skipped)
    raise CorruptCheckpointError("no intact checkpoint to evaluate: " + "; ".join(skipped))


def labelled_measures(
    model: MVTCAE,
    dataset_dir: str | Path,
    test: EvalSplit,
    cfg: EvaluationSection,
    device: torch.device,
    report: EvalReport,
) -> None:
    """Add latent accuracy and coherence (the measures that need labels) to ``report``."""
    if test.labels is None:
        if cfg.latent_accuracy or cfg.coherence:
            warnings.warn(
                f"{dataset_dir} has no labels: latent accuracy and coherence skipped", stacklevel=3
            )
        return
    if cfg.latent_accuracy:
        train = load_eval_split(dataset_dir, "train", cfg.probe_train_samples, cfg.seed)
        metrics, details = latent_accuracy(model, train, test, cfg, device)
        report.metrics.update(metrics)
        report.details["latent_acc_by_subset"] = details
    if cfg.coherence and len(model.modalities) > 1:
        classifiers, accuracies = modality_classifiers(dataset_dir, cfg, device)
        report.metrics.update({f"eval/classifier_acc_{m}": a for m, a in accuracies.items()})
        generate = model_generator(model, from_mean=cfg.coherence_from_mean)
        torch.manual_seed(cfg.seed + 1)  # the same draws whether or not classifiers were trained
        metrics, details = coherence(generate, classifiers, model.modalities, test, cfg, device)
        report.metrics.update(metrics)
        report.details["coherence_by_subset"] = details
