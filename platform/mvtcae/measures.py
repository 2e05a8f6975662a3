"""The measures behind `mvtcae.evaluate.evaluate`: latent probe, coherence, joint NLL, plots.

Kept apart from `mvtcae.evaluate` so that importing the config (`EvalConfig`) stays light.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mvtcae.classifiers import (
    ClassifierData,
    ClassifierSettings,
    accuracy,
    cache_path,
    dataset_digest,
    default_cache_root,
    is_image_shape,
    load_classifier,
    predict_labels,
    save_classifier,
    train_classifier,
)
from mvtcae.model.batch import MultimodalBatch
from mvtcae.model.gaussian import log_normal, log_standard_normal

if TYPE_CHECKING:
    from mvtcae import MVTCAE
    from mvtcae.evaluate import EvalConfig, EvalReport


# ----------------------------------------------------------------------------- data


@dataclass
class EvalSplit:
    """A split held as stored NumPy arrays; batches are built on demand in model scale."""

    data: dict[str, np.ndarray]
    scales: dict[str, float]
    masks: dict[str, np.ndarray]
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(next(iter(self.masks.values())).shape[0])

    def take(self, rows: np.ndarray) -> EvalSplit:
        """The sub-split of the given row indices."""
        return EvalSplit(
            data={m: x[rows] for m, x in self.data.items()},
            scales=dict(self.scales),
            masks={m: x[rows] for m, x in self.masks.items()},
            labels=None if self.labels is None else self.labels[rows],
        )

    def rows_with(self, modalities: Sequence[str]) -> np.ndarray:
        """Indices of rows where every one of ``modalities`` is present."""
        keep = np.ones(len(self), dtype=bool)
        for m in modalities:
            keep &= self.masks[m]
        return np.flatnonzero(keep)

    def values(self, modality: str, rows: np.ndarray | slice) -> Tensor:
        """Model-scale float32 values of one modality's rows (CPU)."""
        x = torch.from_numpy(np.ascontiguousarray(self.data[modality][rows])).float()
        scale = self.scales[modality]
        return x * scale if scale != 1.0 else x

    def batch(
        self,
        rows: np.ndarray | slice,
        modalities: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> MultimodalBatch:
        """A MultimodalBatch of the given rows and modalities (all by default) on ``device``."""
        mods = list(modalities or self.data)
        labels = None if self.labels is None else torch.from_numpy(self.labels[rows])
        batch = MultimodalBatch(
            data={m: self.values(m, rows) for m in mods},
            masks={m: torch.from_numpy(np.ascontiguousarray(self.masks[m][rows])) for m in mods},
            labels=labels,
        )
        return batch.to(device)


def load_eval_split(
    dataset_dir: str | Path, split: str, max_rows: int | None = None, seed: int = 0
) -> EvalSplit:
    """Read a split with `load_split_arrays`, keeping a seeded random subset of ``max_rows``."""
    from mvtcae.data import load_manifest, load_split_arrays

    manifest = load_manifest(dataset_dir)
    arrays = load_split_arrays(dataset_dir, split)
    result = EvalSplit(
        data=arrays["data"],
        scales={m: spec.scale for m, spec in manifest.modalities.items()},
        masks=arrays["masks"],
        labels=arrays["labels"],
    )
    if max_rows is not None and len(result) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(result), max_rows, replace=False))
        result = result.take(rows)
    return result


def subsets_of_size(
    modalities: Sequence[str], k: int, limit: int | None, rng: np.random.Generator
) -> list[tuple[str, ...]]:
    """All k-subsets of the modalities, or a seeded sample of ``limit`` of them."""
    subsets = list(itertools.combinations(modalities, k))
    if limit is not None and len(subsets) > limit:
        picked = sorted(rng.choice(len(subsets), limit, replace=False))
        subsets = [subsets[i] for i in picked]
    return subsets


def decoder_mean(output: Tensor, distribution: str) -> Tensor:
    """Mean of a decoder distribution from the decoder's raw output."""
    if distribution == "bernoulli":
        return torch.sigmoid(output)
    if distribution == "categorical":
        return torch.softmax(output, dim=-1)
    return output


# ----------------------------------------------------------------------------- latent probe


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

    if len(test_y) == 0 or len(np.unique(train_y)) < 2:
        return math.nan
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=max_iter, random_state=seed)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # ConvergenceWarning on tiny sets
        probe.fit(train_z, train_y)
    return float((probe.predict(test_z) == test_y).mean())


def latent_accuracy(
    model: MVTCAE,
    train: EvalSplit,
    test: EvalSplit,
    cfg: EvalConfig,
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
    for k, subset in tqdm(jobs, desc="latent probe", leave=False):
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
        metrics[f"eval/latent_acc_{k}"] = _nanmean(values)
    metrics["eval/latent_acc_mean"] = _nanmean(list(metrics.values()))
    return metrics, details


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


# ----------------------------------------------------------------------------- coherence

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
    cfg: EvalConfig,
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
    for k, subset in tqdm(jobs, desc="coherence", leave=False):
        targets = [m for m in mods if m not in subset]
        scores = coherence_of_subset(
            generate, classifiers, split, subset, targets, cfg.batch_size, device
        )
        details["+".join(subset)] = scores
        per_k.setdefault(k, []).append(_nanmean(list(scores.values())))
    metrics = {f"eval/coherence_{k}": _nanmean(v) for k, v in per_k.items()}
    metrics["eval/coherence_mean"] = _nanmean(list(metrics.values()))
    return metrics, details


def classifier_settings(cfg: EvalConfig) -> ClassifierSettings:
    """The classifier part of an EvalConfig."""
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
    cfg: EvalConfig,
    device: str | torch.device = "cpu",
    train: EvalSplit | None = None,
    test: EvalSplit | None = None,
) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Per-modality classifiers and their test accuracies: from the cache, else trained now."""
    from mvtcae.data import load_manifest

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


# ----------------------------------------------------------------------------- likelihood


@torch.no_grad()
def subset_proposal_nll(
    model: MVTCAE, batch: MultimodalBatch, subset: Sequence[str], K: int, batch_size_K: int
) -> Tensor:
    """Per-row −log p(X) (present modalities), importance-weighted with q(z | X_subset).

    log p(X_i) ≈ logsumexp_k [log p(X_i | z_k) + log p(z_k) − log q(z_k | X_S,i)] − log K with
    z_k ~ q(z | X_S,i): with S = every modality this is the model's joint estimate.
    """
    mu, logvar = model.joint_posterior(batch, list(subset))
    std = torch.exp(0.5 * logvar)
    eps = mu.new_empty((K, *mu.shape)).normal_()
    chunks = []
    for start in range(0, K, batch_size_K):
        z = mu + eps[start : start + batch_size_K] * std
        chunks.append(_importance_log_weights(model, batch, z, mu, logvar))
    log_px = torch.logsumexp(torch.cat(chunks), dim=0) - math.log(K)
    return -log_px


def row_log_likelihood(output: Tensor, target: Tensor, distribution: str, scale: float) -> Tensor:
    """log p(target | decoder output) summed over all but the first dim, one value per row."""
    if distribution == "normal":
        log_p = (
            -((target - output) ** 2) / (2 * scale**2)
            - math.log(scale)
            - 0.5 * math.log(2 * math.pi)
        )
    elif distribution == "laplace":
        log_p = -torch.abs(target - output) / scale - math.log(2 * scale)
    elif distribution == "bernoulli":
        log_p = -nn.functional.binary_cross_entropy_with_logits(output, target, reduction="none")
    elif distribution == "categorical":
        log_soft = torch.log_softmax(output, dim=-1)
        if target.shape == output.shape:
            log_p = target * log_soft
        else:
            log_p = log_soft.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)
    else:
        raise ValueError(f"unknown decoder distribution {distribution!r}")
    return log_p.reshape(log_p.shape[0], -1).sum(-1)


def _importance_log_weights(
    model: MVTCAE, batch: MultimodalBatch, z: Tensor, mu: Tensor, logvar: Tensor
) -> Tensor:
    """log p(X | z) + log N(z; 0, I) − log q(z) for z of shape (k, n, d); returns (k, n)."""
    k, n = z.shape[:2]
    cfg = model.model_config
    log_w = log_standard_normal(z) - log_normal(z, mu, logvar)
    for m, x in batch.data.items():
        out = model.decode(z.reshape(k * n, -1), [m])[m]
        target = x.unsqueeze(0).expand(k, *x.shape).reshape(k * n, *x.shape[1:])
        target = target.to(out.dtype) if target.is_floating_point() else target
        log_p = row_log_likelihood(out, target, cfg.distribution(m), cfg.scale(m)).reshape(k, n)
        if batch.masks is not None and m in batch.masks:
            log_p = torch.where(batch.masks[m], log_p, 0.0)
        log_w = log_w + log_p
    return log_w


def joint_nll(
    model: MVTCAE, split: EvalSplit, cfg: EvalConfig, device: str | torch.device
) -> tuple[dict[str, float], dict[str, float]]:
    """``eval/joint_nll`` per sample, and ``eval/joint_nll_<k>`` with k-subset proposals."""
    rows = np.arange(min(len(split), cfg.nll_max_samples))
    row_batch = max(1, cfg.batch_size // 4)
    total = 0.0
    for start in tqdm(range(0, len(rows), row_batch), desc="joint nll", leave=False):
        batch = split.batch(rows[start : start + row_batch], device=device)
        total += float(
            model.compute_joint_nll(batch, K=cfg.nll_K, batch_size_K=cfg.nll_batch_size_K)
        )
    metrics = {"eval/joint_nll": total / max(len(rows), 1)}
    details: dict[str, float] = {}
    if not cfg.nll_subsets_per_size:
        return metrics, details
    rng = np.random.default_rng(cfg.seed + 2)
    mods = model.modalities
    for k in range(1, len(mods) + 1):
        values = []
        for subset in subsets_of_size(mods, k, cfg.nll_subsets_per_size, rng):
            subset_rows = np.intersect1d(rows, split.rows_with(subset))
            nll = [
                subset_proposal_nll(
                    model,
                    split.batch(subset_rows[s : s + row_batch], device=device),
                    subset,
                    cfg.nll_K,
                    cfg.nll_batch_size_K,
                ).sum()
                for s in range(0, len(subset_rows), row_batch)
            ]
            value = float(sum(nll)) / len(subset_rows) if len(subset_rows) else math.nan
            details["+".join(subset)] = value
            values.append(value)
        metrics[f"eval/joint_nll_{k}"] = _nanmean(values)
    return metrics, details


# ----------------------------------------------------------------------------- plots


def image_modalities(model: MVTCAE) -> list[str]:
    """Modalities whose shape is an image: (C, H, W) with few channels, or (H, W)."""
    dims = model.model_config.input_dims or {}
    return [m for m in model.modalities if m in dims and is_image_shape(tuple(dims[m]))]


@torch.no_grad()
def make_plots(
    model: MVTCAE, split: EvalSplit, cfg: EvalConfig, out_dir: Path, device: str | torch.device
) -> dict[str, Path]:
    """Reconstruction and cross-modal grids (image modalities) and a 2-D latent projection."""
    from mvtcae.plots import save_cross_modal_grid, save_latent_projection, save_reconstruction_grid

    plots: dict[str, Path] = {}
    images = image_modalities(model)
    if images:
        originals, recons = {}, {}
        for m in images:
            rows = split.rows_with([m])[: cfg.grid_samples]
            if len(rows):
                originals[m] = split.values(m, rows).numpy()
                out = model_generator(model, from_mean=True)(
                    split.batch(rows, [m], device), [m], [m]
                )
                recons[m] = out[m].float().cpu().numpy()
        if originals:
            plots["reconstruction"] = save_reconstruction_grid(
                originals, recons, out_dir / "reconstruction.png"
            )
        for source in images:
            rows = split.rows_with([source])[: cfg.grid_samples]
            if not len(rows):
                continue
            out = model_generator(model, from_mean=True)(
                split.batch(rows, [source], device), [source], images
            )
            plots[f"cross_modal_{source}"] = save_cross_modal_grid(
                source,
                split.values(source, rows).numpy(),
                {m: x.float().cpu().numpy() for m, x in out.items()},
                out_dir / f"cross_modal_{source}.png",
            )
    rows = np.arange(min(len(split), cfg.projection_samples))
    z = []
    for start in range(0, len(rows), cfg.batch_size):
        batch = split.batch(rows[start : start + cfg.batch_size], device=device)
        z.append(model.encode(batch, cond_mod="all", return_mean=True).z.float().cpu())
    labels = None if split.labels is None else split.labels[rows]
    if len(rows) >= 3:
        plots["latent_projection"] = save_latent_projection(
            torch.cat(z).numpy(),
            labels,
            out_dir / f"latent_{cfg.projection}.png",
            cfg.projection,
            cfg.seed,
        )
    return plots


def labelled_measures(
    model: MVTCAE,
    dataset_dir: str | Path,
    test: EvalSplit,
    cfg: EvalConfig,
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


def check_modalities(model: MVTCAE, split: EvalSplit, dataset_dir: str | Path) -> None:
    """Refuse a dataset that lacks any of the model's modalities."""
    missing = [m for m in model.modalities if m not in split.data]
    if missing:
        raise ValueError(
            f"{dataset_dir} lacks the model's modalities {missing}; it has {list(split.data)}"
        )
