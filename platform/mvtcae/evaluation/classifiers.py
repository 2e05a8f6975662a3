"""Per-modality label classifiers that judge generated samples (coherence), cached on disk.

A small CNN for image modalities ((C, H, W) or (H, W)), an MLP for everything else, each with a
standardisation layer fitted on the training split. They are trained once per dataset (keyed by
the SHA-256 of its ``manifest.json``, which lists every shard's checksum, and by the training
settings) and stored as safetensors with their test accuracy in the file's metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from mvtcae.config.locations import cache_root
from mvtcae.data import MANIFEST_FILE, DatasetFiles
from mvtcae.evaluation.progress import progress
from mvtcae.safety.names import check_name, path_inside

ARCH_VERSION = "2"


class Standardize(nn.Module):
    """(x - mean) / std with statistics fitted on training data and stored as buffers."""

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class AddChannel(nn.Module):
    """(n, H, W) -> (n, 1, H, W)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """True for (C, H, W) with a few channels, or (H, W), with sides of at least 4."""
    if len(shape) == 3:
        return shape[0] <= 4 and min(shape[1:]) >= 4
    return len(shape) == 2 and min(shape) >= 4


def build_classifier(shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A CNN for image shapes, else an MLP; starts with an identity standardisation."""
    image = is_image_shape(shape)
    stat_shape = (1,) if image else shape
    layers: list[nn.Module] = [Standardize(torch.zeros(stat_shape), torch.ones(stat_shape))]
    if image:
        channels = shape[0] if len(shape) == 3 else 1
        if len(shape) == 2:
            layers.append(AddChannel())
        layers += [
            nn.Conv2d(channels, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, 128),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(128, num_classes),
        ]
    else:
        layers += [
            nn.Flatten(),
            nn.Linear(math.prod(shape), 256),
            nn.ReLU(),
            nn.Linear(256, num_classes),
        ]
    return nn.Sequential(*layers)


@dataclass
class ClassifierData:
    """One modality's labelled rows: stored values, the factor to model scale, and labels."""

    values: np.ndarray
    scale: float
    labels: np.ndarray

    def tensor(self, rows: np.ndarray | slice, device: str | torch.device) -> Tensor:
        """Rows as float32 model-scale inputs on ``device``."""
        x = torch.as_tensor(np.ascontiguousarray(self.values[rows])).to(device).float()
        return x * self.scale if self.scale != 1.0 else x


@dataclass
class ClassifierSettings:
    """How classifiers are trained; part of the cache key."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 2e-3
    train_samples: int | None = None
    seed: int = 0

    def key(self) -> str:
        """A short digest of the settings and the architecture version."""
        text = json.dumps({**self.__dict__, "arch": ARCH_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _fit_standardize(model: nn.Module, data: ClassifierData, shape: tuple[int, ...]) -> None:
    x = data.tensor(slice(0, min(len(data.labels), 5000)), "cpu").double()
    if is_image_shape(shape):
        mean, std = x.mean().reshape(1), x.std().reshape(1)
    else:
        mean, std = x.mean(dim=0), x.std(dim=0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    norm = model[0]
    norm.mean.copy_(mean.float())
    norm.std.copy_(std.float())


@torch.no_grad()
def predict_labels(classifier: nn.Module, x: Tensor, batch_size: int = 512) -> Tensor:
    """Arg-max class of each row of ``x`` (model-scale inputs)."""
    classifier.eval()
    return torch.cat(
        [classifier(x[i : i + batch_size]).argmax(dim=-1) for i in range(0, len(x), batch_size)]
    )


def accuracy(classifier: nn.Module, data: ClassifierData, device: str | torch.device) -> float:
    """Fraction of ``data`` rows whose label the classifier predicts."""
    if len(data.labels) == 0:
        return math.nan
    hits = 0
    for start in range(0, len(data.labels), 1024):
        rows = slice(start, start + 1024)
        predicted = predict_labels(classifier, data.tensor(rows, device)).cpu().numpy()
        hits += int((predicted == data.labels[rows]).sum())
    return hits / len(data.labels)


def train_classifier(
    shape: tuple[int, ...],
    num_classes: int,
    train: ClassifierData,
    settings: ClassifierSettings,
    device: str | torch.device = "cpu",
    name: str = "",
) -> nn.Module:
    """Train a classifier for one modality with Adam and cross-entropy; returns it in eval mode."""
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = build_classifier(shape, num_classes)
    _fit_standardize(model, train, shape)
    model.to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    n = len(train.labels)
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    for _ in progress(range(settings.epochs), f"classifier {name}"):
        order = torch.randperm(n, generator=generator).numpy()
        for start in range(0, n, settings.batch_size):
            rows = np.sort(order[start : start + settings.batch_size])
            logits = model(train.tensor(rows, device))
            loss = nn.functional.cross_entropy(logits, labels[rows].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def dataset_digest(dataset_dir: str | os.PathLike) -> str:
    """SHA-256 of the dataset's manifest.json (which records every shard's SHA-256)."""
    return hashlib.sha256(DatasetFiles(dataset_dir).read_bytes(MANIFEST_FILE)).hexdigest()


def default_cache_root() -> Path:
    """``$MVTCAE_CACHE_DIR/classifiers``, else ``~/.cache/mvtcae/classifiers``."""
    return cache_root() / "classifiers"


def cache_path(
    cache_root: Path, dataset_name: str, digest: str, modality: str, settings: ClassifierSettings
) -> Path:
    """Where one modality's classifier for this dataset and these settings is cached.

    The dataset and modality names become path components, so they must be safe names
    (``UnsafeNameError`` otherwise) and the result must stay under ``cache_root``.
    """
    check_name(dataset_name, "dataset name")
    check_name(modality, "modality name")
    relative = f"{dataset_name}-{digest[:16]}/{modality}-{settings.key()}.safetensors"
    return path_inside(cache_root, relative, "classifier cache file")


def save_classifier(path: Path, model: nn.Module, meta: dict[str, str]) -> None:
    """Write weights + metadata atomically (a concurrent reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_classifier(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a cached classifier; returns (model in eval mode, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    model = build_classifier(tuple(json.loads(meta["shape"])), int(meta["num_classes"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval(), meta
