"""The model's input type: a batch of multimodal samples with presence masks and labels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class MultimodalBatch:
    """A batch of n samples: one tensor per modality, optional presence masks and labels.

    ``data[m]`` has shape (n, *shape_m). ``masks[m]`` is a bool tensor (n,), True where
    modality m is observed; missing rows hold finite placeholders (zeros). ``masks=None``
    means every modality is present in every row.
    """

    data: dict[str, Tensor]
    masks: dict[str, Tensor] | None = None
    labels: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.data:
            raise ValueError("MultimodalBatch.data is empty: give at least one modality")
        sizes = {m: int(x.shape[0]) for m, x in self.data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"MultimodalBatch modalities disagree on batch size: {sizes}")
        n = next(iter(sizes.values()))
        for m, mask in (self.masks or {}).items():
            if m not in self.data:
                raise ValueError(f"MultimodalBatch.masks names modality {m!r} that has no data")
            if mask.shape != (n,):
                raise ValueError(
                    f"MultimodalBatch.masks[{m!r}] has shape {tuple(mask.shape)}, expected ({n},)"
                )
        if self.labels is not None and int(self.labels.shape[0]) != n:
            raise ValueError(
                f"MultimodalBatch.labels has {int(self.labels.shape[0])} rows, expected {n}"
            )

    def __len__(self) -> int:
        return int(next(iter(self.data.values())).shape[0])

    @property
    def modalities(self) -> list[str]:
        """Names of the modalities carried by the batch."""
        return list(self.data)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultimodalBatch:
        """Return the batch with every tensor moved to ``device``."""

        def move(t: Tensor) -> Tensor:
            return t.to(device, non_blocking=non_blocking)

        return MultimodalBatch(
            data={m: move(x) for m, x in self.data.items()},
            masks=None if self.masks is None else {m: move(x) for m, x in self.masks.items()},
            labels=None if self.labels is None else move(self.labels),
            meta=dict(self.meta),
        )

    def select(self, rows: Tensor | slice) -> MultimodalBatch:
        """Return the sub-batch of the given rows (index tensor, bool tensor or slice).

        Per-row ``meta`` entries (tensors or arrays with one entry per row, such as sample ids)
        are selected too; other entries are carried over unchanged.
        """
        n = len(self)
        return MultimodalBatch(
            data={m: x[rows] for m, x in self.data.items()},
            masks=None if self.masks is None else {m: x[rows] for m, x in self.masks.items()},
            labels=None if self.labels is None else self.labels[rows],
            meta={k: _select_rows(v, rows, n) for k, v in self.meta.items()},
        )


def _select_rows(value: Any, rows: Tensor | slice, n: int) -> Any:
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0 or shape[0] != n:
        return value
    if isinstance(value, Tensor) or isinstance(rows, slice):
        return value[rows]
    return value[rows.cpu().numpy()]  # NumPy arrays take NumPy indices


def as_batch(inputs: Any) -> MultimodalBatch:
    """Accept a MultimodalBatch, a multivae-style dataset output, or a dict with ``data``."""
    if isinstance(inputs, MultimodalBatch):
        return inputs
    if isinstance(inputs, Mapping):
        if "data" not in inputs:
            raise TypeError("model input mapping has no 'data' key: expected {'data': {...}, ...}")
        return MultimodalBatch(
            data=dict(inputs["data"]), masks=inputs.get("masks"), labels=inputs.get("labels")
        )
    if hasattr(inputs, "data"):
        masks = getattr(inputs, "masks", None)
        labels = getattr(inputs, "labels", None)
        return MultimodalBatch(
            data=dict(inputs.data), masks=None if masks is None else dict(masks), labels=labels
        )
    raise TypeError(
        f"model input of type {type(inputs).__name__} is not a batch: "
        "pass a MultimodalBatch or an object with .data (and optional .masks, .labels)"
    )
