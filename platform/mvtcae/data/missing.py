"""Missing modalities drawn at random: presence masks for a split, alone or combined with the
masks it has."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from mvtcae.data.arrays import SplitArrays


def random_presence(
    num_rows: int, modalities: Iterable[str], missing_ratio: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Presence masks where each modality is absent with probability ``missing_ratio``.

    A row that would lose every modality gets one modality, chosen uniformly, back, so the
    realised missing fraction is ``r - r**M / M`` for M modalities.
    """
    names = list(modalities)
    if not 0.0 <= missing_ratio < 1.0:
        raise ValueError(f"missing_ratio must be in [0, 1), got {missing_ratio}")
    present = rng.random((num_rows, len(names))) >= missing_ratio
    empty = ~present.any(axis=1)
    present[np.flatnonzero(empty), rng.integers(0, len(names), size=int(empty.sum()))] = True
    return {name: present[:, j].copy() for j, name in enumerate(names)}


def with_missing(part: SplitArrays, missing_ratio: float, rng: np.random.Generator) -> SplitArrays:
    """Return ``part`` with random presence masks (AND-ed with its own masks, if any)."""
    drawn = random_presence(part.num_rows, part.data, missing_ratio, rng)
    if part.masks:
        drawn = {m: drawn[m] & np.asarray(part.masks.get(m, True), bool) for m in drawn}
        empty = ~np.stack(list(drawn.values()), axis=1).any(axis=1)
        if empty.any():  # keep one modality the user had observed
            for m in part.data:
                own = np.asarray(part.masks.get(m, np.ones(part.num_rows, bool)), bool)
                fix = empty & own
                drawn[m] |= fix
                empty &= ~fix
    return SplitArrays(data=part.data, masks=drawn, labels=part.labels, ids=part.ids)
