"""Learning curves: coherence and latent-probe accuracy against training wall time, for
candidate demo settings side by side.

Each setting trains the platform's own model with the platform's own step
(`mvtcae.training.run_train_epoch`) in this process, on a built-in dataset held in memory, for a
time budget; every ``--eval-every`` seconds of training it measures, on the validation split,
coherence given k = 1..M-1 modalities and the linear probe given one modality (evaluation time
is not counted as training time). It writes a JSON of every point and a plot of coherence given
M-1 modalities and probe accuracy given 1 against training seconds, one line per setting.

    .venv/bin/python jobs/bench_learning.py --settings polymnist-conv,mfeat-mlp --budget 150
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

# Candidate settings: (config overrides on the embedded defaults). Names are CLI choices.
SETTINGS: dict[str, list[str]] = {
    # The paper's PolyMNIST setting at demo size.
    "polymnist-paper": [
        "data.dataset=polymnist",
        "data.n_train=5000",
        "data.n_test=1000",
        "model.networks=conv",
        "model.latent_dim=64",
        "model.beta=2.5",
        "train.batch_size=256",
        "train.optimizer.lr=0.001",
        "train.precision=bf16",
    ],
    # Lighter KL and a sharper likelihood: more of the image must be explained by z.
    "polymnist-sharp": [
        "data.dataset=polymnist",
        "data.n_train=5000",
        "data.n_test=1000",
        "model.networks=conv",
        "model.latent_dim=32",
        "model.beta=0.5",
        "model.decoder_scale=0.1",
        "train.batch_size=128",
        "train.optimizer.lr=0.002",
        "train.precision=bf16",
    ],
    "polymnist-mlp-sharp": [
        "data.dataset=polymnist",
        "data.n_train=5000",
        "data.n_test=1000",
        "model.networks=mlp",
        "model.latent_dim=32",
        "model.beta=0.5",
        "model.decoder_scale=0.1",
        "train.batch_size=128",
        "train.optimizer.lr=0.002",
    ],
    "polymnist-sharper": [
        "data.dataset=polymnist",
        "data.n_train=5000",
        "data.n_test=1000",
        "model.networks=conv",
        "model.latent_dim=16",
        "model.beta=0.25",
        "model.decoder_scale=0.05",
        "train.batch_size=128",
        "train.optimizer.lr=0.003",
        "train.precision=bf16",
    ],
    "polymnist-sharp-b1": [
        "data.dataset=polymnist",
        "data.n_train=5000",
        "data.n_test=1000",
        "model.networks=conv",
        "model.latent_dim=32",
        "model.beta=1.0",
        "model.decoder_scale=0.1",
        "train.batch_size=128",
        "train.optimizer.lr=0.002",
        "train.precision=bf16",
    ],
    # UCI Multiple Features: six views of handwritten digits.
    "mfeat-mlp": [
        "data.dataset=mfeat",
        "data.dir=data/mfeat",
        "model.networks=mlp",
        "model.latent_dim=32",
        "model.beta=2.5",
        "model.decoder_scale=1.0",
        "train.batch_size=128",
        "train.optimizer.lr=0.001",
    ],
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds per setting")
    p.add_argument("--eval-every", type=float, default=30.0, help="training seconds between evals")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-rows", type=int, default=500)
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "bench_learning")
    return p.parse_args()


def _batches(arrays: dict, scales: dict, order: np.ndarray, batch: int):
    from mvtcae import MultimodalBatch

    for start in range(0, len(order) - batch + 1, batch):
        rows = order[start : start + batch]
        yield MultimodalBatch(
            data={
                m: torch.from_numpy(arrays["data"][m][rows]).float() * scales[m]
                for m in arrays["data"]
            },
            masks={m: torch.from_numpy(arrays["masks"][m][rows]) for m in arrays["masks"]},
        )


def measure(model: Any, dataset: Path, eval_cfg: Any, val: Any, classifiers: dict) -> dict:
    """Coherence given k and probe accuracy given 1 on the validation rows."""
    from mvtcae.evaluation.coherence import coherence, model_generator
    from mvtcae.evaluation.probe import latent_accuracy
    from mvtcae.evaluation.split import load_eval_split

    model.eval()
    out: dict[str, float] = {}
    scores, _ = coherence(model_generator(model), classifiers, model.modalities, val, eval_cfg)
    out.update(scores)
    train = load_eval_split(dataset, "train", eval_cfg.probe_train_samples, 0)
    cfg1 = eval_cfg.model_copy(update={"max_subsets_per_size": 2})
    probe, _ = latent_accuracy(model, train, val, cfg1, "cpu")
    out.update(probe)
    model.train()
    return out


def run_setting(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    from mvtcae import MVTCAE
    from mvtcae.config import EvaluationSection, load_config
    from mvtcae.data import load_split_arrays
    from mvtcae.evaluation.coherence import modality_classifiers
    from mvtcae.evaluation.split import load_eval_split
    from mvtcae.training import build_optimizer, model_config_for, prepare_dataset, run_train_epoch

    cfg = load_config(None, [*overrides, f"train.seed={args.seed}"])
    dataset, manifest = prepare_dataset(cfg)
    torch.manual_seed(args.seed)
    model = MVTCAE(model_config_for(cfg.model, manifest))
    optimizer = build_optimizer(model.parameters(), cfg.train)
    arrays = load_split_arrays(dataset, "train")
    scales = {m: spec.scale for m, spec in manifest.modalities.items()}
    val_split = "val" if "val" in manifest.splits else "test"
    eval_cfg = EvaluationSection(
        max_samples=args.eval_rows,
        max_subsets_per_size=3,
        probe_train_samples=2000,
        probe_max_iter=300,
        classifier_epochs=cfg.eval.classifier_epochs,
    )
    val = load_eval_split(dataset, val_split, args.eval_rows, 0)
    classifiers, accuracies = modality_classifiers(dataset, eval_cfg)
    rng = np.random.default_rng(args.seed)
    n = len(arrays["ids"])
    points, trained, samples, epoch = [], 0.0, 0, 0
    next_eval = 0.0
    while trained < args.budget:
        if trained >= next_eval:
            point = {
                "train_s": trained,
                "samples": samples,
                "epoch": epoch,
                **measure(model, dataset, eval_cfg, val, classifiers),
            }
            points.append(point)
            print(
                f"[{name}] {trained:6.1f}s  "
                + "  ".join(
                    f"{k.removeprefix('eval/')}={v:.3f}"
                    for k, v in point.items()
                    if k.startswith("eval/coherence_") or k == "eval/latent_acc_1"
                )
            )
            next_eval += args.eval_every
        start = time.perf_counter()
        sums = run_train_epoch(
            model,
            _batches(arrays, scales, rng.permutation(n), cfg.train.batch_size),
            optimizer,
            torch.device("cpu"),
            cfg.train,
            epoch=epoch + 1,
        )
        trained += time.perf_counter() - start
        samples += int(sums["rows"])
        epoch += 1
    points.append(
        {
            "train_s": trained,
            "samples": samples,
            "epoch": epoch,
            **measure(model, dataset, eval_cfg, val, classifiers),
        }
    )
    return {
        "setting": name,
        "overrides": overrides,
        "classifier_acc": accuracies,
        "modalities": len(manifest.modalities),
        "points": points,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        top = result["modalities"] - 1
        xs = [p["train_s"] for p in result["points"]]
        left.plot(
            xs,
            [p.get(f"eval/coherence_{top}", math.nan) for p in result["points"]],
            marker="o",
            label=result["setting"],
        )
        right.plot(
            xs,
            [p.get("eval/latent_acc_1", math.nan) for p in result["points"]],
            marker="o",
            label=result["setting"],
        )
    left.set(title="coherence given M-1 modalities", xlabel="training seconds (2 CPU threads)")
    right.set(title="latent probe given 1 modality", xlabel="training seconds (2 CPU threads)")
    for axis, target in ((left, 0.5), (right, 0.8)):
        axis.axhline(target, color="grey", linestyle="--", linewidth=1)
        axis.axhline(0.1, color="red", linestyle=":", linewidth=1, label="chance (10 classes)")
        axis.set_ylim(0, 1)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.settings.split(","):
        results.append(run_setting(name, SETTINGS[name], args))
        (args.out / "curves.json").write_text(json.dumps(results, indent=2))
        plot(results, args.out / "curves.png")
    print(f"wrote {args.out / 'curves.json'} and {args.out / 'curves.png'}")


if __name__ == "__main__":
    main()
