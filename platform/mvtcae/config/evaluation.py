"""The ``eval`` section: which measures an evaluation computes, and how much it may spend.

Each field that drives the cost says what it costs; ``mvtcae.evaluation.evaluation_cost`` adds it
up for a model before the evaluation starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from mvtcae.config.base import Section


class EvaluationSection(Section):
    """Which measures to compute and how much data and compute to spend on each."""

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
        default=1000,
        ge=1,
        description="importance samples per row: the joint NLL costs nll_max_samples x nll_K x M "
        "decoder passes",
    )
    nll_batch_size_K: int = Field(default=100, ge=1, description="samples per vectorised step")
    nll_max_samples: int = Field(default=100, ge=1, description="rows of the likelihood estimates")
    nll_subsets_per_size: int | None = Field(
        default=1,
        ge=0,
        description="subset proposals per size k for joint_nll_<k> (0 disables): each costs as "
        "much as the joint NLL, M subsets at 1 per size",
    )
    grid_samples: int = Field(default=8, ge=1)
    images_every_n_epochs: int = Field(
        default=1,
        ge=0,
        description="during training, log reconstruction and cross-modal grids of fixed "
        "validation samples to the MLflow run every N epochs, with the epoch as step (image "
        "modalities only; 0: only the final evaluation's)",
    )
    projection: Literal["pca", "tsne"] = "pca"
    projection_samples: int = Field(default=1000, ge=10)

    @field_validator("classifier_cache_dir")
    @classmethod
    def _absolute_cache_dir(cls, value: Path | None) -> Path | None:
        # Ray tasks run in their own session directories: resolve once, where the config is built.
        return None if value is None else Path(value).expanduser().resolve()
