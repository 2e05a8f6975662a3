"""PNG plots of an evaluation: reconstruction and cross-modal grids, 2-D latent projection, and
the trend of coherence and probe accuracy by number of conditioning modalities.

Figures are built with ``matplotlib.figure.Figure`` (Agg canvas), so no pyplot state is created.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure

from mvtcae.config.evaluation import EvaluationSection
from mvtcae.evaluation.classifiers import is_image_shape
from mvtcae.evaluation.coherence import model_generator
from mvtcae.evaluation.split import EvalSplit

if TYPE_CHECKING:
    from mvtcae import MVTCAE


def to_display(images: np.ndarray) -> np.ndarray:
    """(n, C, H, W) or (n, H, W) model-scale images -> (n, H, W[, 3]) floats in [0, 1]."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 4:
        x = np.moveaxis(x, 1, -1)
        if x.shape[-1] == 1:
            x = x[..., 0]
        elif x.shape[-1] != 3:
            x = x[..., :3] if x.shape[-1] > 3 else x[..., 0]
    low, high = float(x.min(initial=0.0)), float(x.max(initial=1.0))
    if low < 0.0 or high > 1.0:
        x = (x - low) / max(high - low, 1e-8)
    return np.clip(x, 0.0, 1.0)


def _image_grid(rows: list[tuple[str, np.ndarray]], path: Path, title: str) -> Path:
    n_cols = max(len(images) for _, images in rows)
    fig = Figure(figsize=(1.1 * n_cols + 1.2, 1.1 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (label, images) in enumerate(rows):
        shown = to_display(images)
        for c in range(n_cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(shown):
                ax.imshow(shown[c], cmap="gray" if shown[c].ndim == 2 else None, vmin=0, vmax=1)
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


def save_reconstruction_grid(
    originals: Mapping[str, np.ndarray], reconstructions: Mapping[str, np.ndarray], path: Path
) -> Path:
    """Rows of originals and their reconstructions (from the same modality), per modality."""
    rows = []
    for m, x in originals.items():
        rows += [(f"{m}", x), (f"{m} recon", reconstructions[m])]
    return _image_grid(rows, Path(path), "reconstructions (row pairs: input, reconstruction)")


def save_cross_modal_grid(
    source: str, inputs: np.ndarray, generated: Mapping[str, np.ndarray], path: Path
) -> Path:
    """The conditioning images on top, then one row per modality generated from them."""
    rows = [(f"{source} (input)", inputs)] + [(f"-> {m}", x) for m, x in generated.items()]
    return _image_grid(rows, Path(path), f"cross-modal generation from {source}")


def project_2d(z: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D projection of latent vectors with scikit-learn's PCA or t-SNE."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, len(z) // 4)))
        return TSNE(n_components=2, perplexity=perplexity, random_state=seed).fit_transform(z)
    from sklearn.decomposition import PCA

    if z.shape[1] == 1:
        return np.concatenate([z, np.zeros_like(z)], axis=1)
    return PCA(n_components=2, random_state=seed).fit_transform(z)


def save_latent_projection(
    z: np.ndarray, labels: np.ndarray | None, path: Path, method: str = "pca", seed: int = 0
) -> Path:
    """Scatter of the 2-D projection of posterior means, coloured by label."""
    points = project_2d(np.asarray(z, dtype=np.float64), method, seed)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
    else:
        scatter = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(scatter, ax=ax, label="label")
    ax.set_title(f"joint posterior means, {method.upper()} ({len(points)} samples)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def save_trend_plot(
    metrics: Mapping[str, float], num_classes: int | None, path: Path, title: str = ""
) -> Path | None:
    """Coherence and latent-probe accuracy against the number of conditioning modalities,
    chance (1 / classes) marked; None when the metrics hold neither measure."""
    series = {}
    for name, prefix in (("coherence", "eval/coherence_"), ("latent probe", "eval/latent_acc_")):
        points = sorted(
            (int(k.removeprefix(prefix)), v)
            for k, v in metrics.items()
            if k.startswith(prefix) and k.removeprefix(prefix).isdigit() and np.isfinite(v)
        )
        if points:
            series[name] = points
    if not series:
        return None
    fig = Figure(figsize=(5.2, 3.6))
    ax = fig.subplots()
    for (name, points), marker in zip(series.items(), ("o", "s"), strict=False):
        ks, values = zip(*points, strict=True)
        ax.plot(ks, values, marker=marker, label=name)
    if num_classes:
        ax.axhline(
            1.0 / num_classes,
            color="grey",
            linestyle="--",
            linewidth=1,
            label=f"chance (1/{num_classes})",
        )
    ax.set_xlabel("conditioning modalities")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.0)
    all_k = sorted({k for points in series.values() for k, _ in points})
    ax.set_xticks(all_k)
    ax.set_title(title or "coherence and latent probe by number of modalities")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def image_modalities(model: MVTCAE) -> list[str]:
    """Modalities whose shape is an image: (C, H, W) with few channels, or (H, W)."""
    dims = model.model_config.input_dims or {}
    return [m for m in model.modalities if m in dims and is_image_shape(tuple(dims[m]))]


@torch.no_grad()
def image_grids(
    model: MVTCAE, split: EvalSplit, grid_samples: int, out_dir: Path, device: str | torch.device
) -> dict[str, Path]:
    """Reconstruction and cross-modal grids of the first ``grid_samples`` rows of ``split`` that
    have each image modality (none when the model has no image modality)."""
    plots: dict[str, Path] = {}
    images = image_modalities(model)
    if not images:
        return plots
    originals, recons = {}, {}
    for m in images:
        rows = split.rows_with([m])[:grid_samples]
        if len(rows):
            originals[m] = split.values(m, rows).numpy()
            out = model_generator(model, from_mean=True)(split.batch(rows, [m], device), [m], [m])
            recons[m] = out[m].float().cpu().numpy()
    if originals:
        plots["reconstruction"] = save_reconstruction_grid(
            originals, recons, out_dir / "reconstruction.png"
        )
    for source in images:
        rows = split.rows_with([source])[:grid_samples]
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
    return plots


@torch.no_grad()
def make_plots(
    model: MVTCAE,
    split: EvalSplit,
    cfg: EvaluationSection,
    out_dir: Path,
    device: str | torch.device,
) -> dict[str, Path]:
    """Reconstruction and cross-modal grids (image modalities) and a 2-D latent projection."""
    plots = image_grids(model, split, cfg.grid_samples, out_dir, device)
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
