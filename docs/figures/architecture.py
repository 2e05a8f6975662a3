"""Draw docs/figures/architecture.png from the package's real imports.

    .venv/bin/python docs/figures/architecture.py

Each box is a package at the height of its layer (tests/test_layout.py's ``LAYERS``, the rule the
layering test enforces); each arrow is a package that imports another, found by the same AST scan
as the test, so the picture cannot drift from the code.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "tests"))
import test_layout as layout  # noqa: E402

ROLES = {
    "model": "MVTCAE in PyTorch",
    "safety": "names, secrets, trust",
    "config": "pydantic sections",
    "data": "Parquet shards, Ray Data",
    "storage": "runs, checkpoints, Ray",
    "tracking": "MLflow runs, registry",
    "evaluation": "probe, coherence, NLL",
    "training": "run lifecycle, Train loop",
    "cluster": "local dev cluster",
    "sweep": "Ray Tune + Optuna",
    "cli": "`mvtcae` commands",
}


def package_edges() -> set[tuple[str, str]]:
    """(importer, imported) between layered packages."""
    edges = set()
    for module, targets in layout._graph().items():
        src = layout._top(module)
        for target in targets:
            dst = layout._top(target)
            if src != dst and "__init__" not in (src, dst):
                edges.add((src, dst))
    return edges


def main() -> None:
    rows: dict[int, list[str]] = defaultdict(list)
    for name, layer in layout.LAYERS.items():
        rows[layer].append(name)
    pos = {}
    for layer, names in rows.items():
        for i, name in enumerate(names):
            pos[name] = ((i - (len(names) - 1) / 2) * 3.2, layer * 1.25)
    fig, ax = plt.subplots(figsize=(8.5, 10))
    for src, dst in sorted(package_edges()):
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        ax.annotate(
            "", xy=(x1, y1 + 0.3), xytext=(x0, y0 - 0.3),
            arrowprops={"arrowstyle": "-|>", "color": "0.55", "lw": 0.8,
                        "shrinkA": 0, "shrinkB": 0, "connectionstyle": "arc3,rad=0.08"},
        )  # fmt: skip
    for name, (x, y) in pos.items():
        ax.text(
            x, y, f"{name}/\n{ROLES[name]}", ha="center", va="center", fontsize=9,
            bbox={"boxstyle": "round,pad=0.45", "fc": "#e8f0fb", "ec": "#3b6ea8"}, zorder=5,
        )  # fmt: skip
        ax.text(-5.6, y, f"layer {layout.LAYERS[name]}", va="center", fontsize=8, color="0.4")
    ax.set_xlim(-6, 4.6)
    ax.set_ylim(-0.8, max(rows) * 1.25 + 0.8)
    ax.axis("off")
    ax.set_title("mvtcae packages: every arrow is an import, and every import points down")
    out = HERE / "architecture.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(out)


if __name__ == "__main__":
    main()
