"""What an evaluation reports, and what it will cost before it runs."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvtcae.config.evaluation import EvaluationSection


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


def evaluation_cost(cfg: EvaluationSection, modalities: int, rows: int) -> dict[str, int]:
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
