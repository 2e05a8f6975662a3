"""Coherence: cross-modal generations judged by per-modality classifiers (cached per dataset)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mvtcae.config.evaluation import EvaluationSection
from mvtcae.data import load_manifest
from mvtcae.evaluation.classifiers import (
    ClassifierData,
    ClassifierSettings,
    accuracy,
    cache_path,
    dataset_digest,
    default_cache_root,
    load_classifier,
    predict_labels,
    save_classifier,
    train_classifier,
)
from mvtcae.evaluation.progress import progress
from mvtcae.evaluation.split import EvalSplit, load_eval_split, nanmean, subsets_of_size
from mvtcae.model.batch import MultimodalBatch
from mvtcae.model.likelihoods import decoder_mean

if TYPE_CHECKING:
    from mvtcae import MVTCAE


Generator = Callable[[MultimodalBatch, list[str], list[str]], dict[str, Tensor]]


def model_generator(model: MVTCAE, from_mean: bool = False) -> Generator:
    """Cross-modal generation by the model: decoder means of ``targets`` given ``cond``."""

    @torch.no_grad()
    def generate(batch: MultimodalBatch, cond: list[str], targets: list[str]) -> dict[str, Tensor]:
        out = model.predict(batch, cond_mod=cond, gen_mod=targets, return_mean=from_mean)
        return {m: decoder_mean(out[m], model.model_config.distribution(m)) for m in targets}

    return generate


@torch.no_grad()
def coherence_of_subset(
    generate: Generator,
    classifiers: Mapping[str, nn.Module],
    split: EvalSplit,
    subset: Sequence[str],
    targets: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """For each target modality: the fraction of its generations classified as the true label."""
    rows = split.rows_with(subset)
    hits = dict.fromkeys(targets, 0)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        generated = generate(split.batch(chunk, subset, device), list(subset), list(targets))
        truth = torch.from_numpy(split.labels[chunk])
        for m in targets:
            predicted = predict_labels(classifiers[m], generated[m].float()).cpu()
            hits[m] += int((predicted == truth).sum())
    if len(rows) == 0:
        return dict.fromkeys(targets, math.nan)
    return {m: hits[m] / len(rows) for m in targets}


def coherence(
    generate: Generator,
    classifiers: Mapping[str, nn.Module],
    modalities: Sequence[str],
    split: EvalSplit,
    cfg: EvaluationSection,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``eval/coherence_<k>`` for k = 1..M-1: mean over k-subsets of their targets' coherence."""
    rng = np.random.default_rng(cfg.seed + 1)
    mods = list(modalities)
    jobs = [
        (k, s)
        for k in range(1, len(mods))
        for s in subsets_of_size(mods, k, cfg.max_subsets_per_size, rng)
    ]
    per_k: dict[int, list[float]] = {}
    details = {}
    for k, subset in progress(jobs, "coherence"):
        targets = [m for m in mods if m not in subset]
        scores = coherence_of_subset(
            generate, classifiers, split, subset, targets, cfg.batch_size, device
        )
        details["+".join(subset)] = scores
        per_k.setdefault(k, []).append(nanmean(list(scores.values())))
    metrics = {f"eval/coherence_{k}": nanmean(v) for k, v in per_k.items()}
    metrics["eval/coherence_mean"] = nanmean(list(metrics.values()))
    return metrics, details


def classifier_settings(cfg: EvaluationSection) -> ClassifierSettings:
    """The classifier part of an EvaluationSection."""
    return ClassifierSettings(
        epochs=cfg.classifier_epochs,
        batch_size=cfg.classifier_batch_size,
        lr=cfg.classifier_lr,
        train_samples=cfg.classifier_train_samples,
        seed=cfg.seed,
    )


def _classifier_data(split: EvalSplit, m: str, limit: int | None, seed: int) -> ClassifierData:
    rows = split.rows_with([m])
    if limit is not None and len(rows) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))
    return ClassifierData(split.data[m][rows], split.scales[m], split.labels[rows])


def modality_classifiers(
    dataset_dir: str | Path,
    cfg: EvaluationSection,
    device: str | torch.device = "cpu",
    train: EvalSplit | None = None,
    test: EvalSplit | None = None,
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Per-modality classifiers and their test accuracies: from the cache, else trained now."""
    manifest = load_manifest(dataset_dir)
    if not manifest.has_labels:
        raise ValueError(f"{dataset_dir}: the dataset has no labels; coherence needs them")
    num_classes = manifest.num_classes or 0
    settings = classifier_settings(cfg)
    root = Path(cfg.classifier_cache_dir) if cfg.classifier_cache_dir else default_cache_root()
    digest = dataset_digest(dataset_dir)
    classifiers, accuracies = {}, {}
    for m, spec in manifest.modalities.items():
        path = cache_path(root, manifest.name, digest, m, settings)
        if path.is_file():
            classifiers[m], meta = load_classifier(path, device)
            accuracies[m] = float(meta["test_acc"])
            continue
        train = train or load_eval_split(dataset_dir, "train")
        test = test or load_eval_split(dataset_dir, _test_split(manifest))
        num_classes = num_classes or int(train.labels.max()) + 1
        data = _classifier_data(train, m, settings.train_samples, settings.seed)
        model = train_classifier(tuple(spec.shape), num_classes, data, settings, device, name=m)
        accuracies[m] = accuracy(model, _classifier_data(test, m, None, 0), device)
        meta = {"shape": json.dumps(list(spec.shape)), "num_classes": str(num_classes)}
        save_classifier(path, model, {**meta, "test_acc": repr(accuracies[m]), "modality": m})
        classifiers[m] = model
    return classifiers, accuracies


def _test_split(manifest: Any) -> str:
    return "test" if "test" in manifest.splits else next(s for s in manifest.splits if s != "train")
