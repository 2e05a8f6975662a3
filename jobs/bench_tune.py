"""Benchmark of the tuning stack: Tune's overhead, and TPE against random search.

1. Overhead (``--sweep CONFIG``): the sweep's wall time against the summed time of its trials,
   and, per trial, the part spent in epochs (train + validation, from the child runs' per-epoch
   ``perf/epoch_time_s``) against the rest (Ray Train start-up, data, evaluation, Tune). With
   ``--run-sweep`` the sweep is run first; otherwise an existing sweep of that config is read.
2. Search (``--search``): on a cheap but real version of the task (a small MVTCAE trained for a
   few hundred steps on mfeat in-process, objective the validation joint NLL of a held-out part
   of the training split), Optuna's TPE and random search with the same budget, over seeds.

    python jobs/bench_tune.py --search --seeds 5 --budget 20
    python jobs/bench_tune.py --sweep jobs/configs/tune_mfeat.yaml --set tune.num_samples=6 --run-sweep
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT_DIR = Path("outputs/bench_tune")


# --------------------------------------------------------------------------------------------
# 1. Tune overhead
# --------------------------------------------------------------------------------------------
def sweep_overhead(spec: Any) -> dict[str, Any]:
    """Wall time vs summed trial time of a finished sweep, and per-trial epoch vs fixed time."""
    from ray.tune import ExperimentAnalysis

    from mvtcae import storage, tracking
    from mvtcae.config.sweep import SWEEP_STATE_FILE

    state = json.loads(storage.read_text(storage.join(spec.experiment_dir, SWEEP_STATE_FILE)))
    client = tracking.client_for(spec.experiment.tracking)
    parent = client.get_run(state["parent_run_id"]).data.metrics
    analysis = ExperimentAnalysis(spec.experiment_dir)
    trials = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        run_id = last.get("mlflow_run_id")
        if not run_id or "time_total_s" not in last:
            continue
        epochs = client.get_metric_history(run_id, "perf/epoch_time_s")
        in_epochs = sum(m.value for m in epochs)
        total = float(last["time_total_s"])
        trials.append(
            {
                "trial": trial.trial_id,
                "time_s": total,
                "epoch_s": in_epochs,
                "epochs": len(epochs),
                "fixed_s": total - in_epochs,
            }
        )
    summed = sum(t["time_s"] for t in trials)
    wall = parent.get("sweep/wall_time_s", math.nan)
    concurrency = spec.tune.max_concurrent
    return {
        "study": spec.study_name,
        "trials": trials,
        "sweep_wall_s": wall,
        "summed_trial_s": summed,
        "max_concurrent": concurrency,
        "wall_over_summed": wall / summed if summed else math.nan,
        "wall_over_ideal": wall / (summed / concurrency) if summed else math.nan,
        "epoch_fraction": sum(t["epoch_s"] for t in trials) / summed if summed else math.nan,
        "fixed_per_trial_s": _spread([t["fixed_s"] for t in trials]),
        "epoch_per_trial_s": _spread([t["epoch_s"] / max(t["epochs"], 1) for t in trials]),
    }


def _spread(values: list[float]) -> dict[str, float]:
    if not values:
        return {"median": math.nan, "q25": math.nan, "q75": math.nan, "n": 0}
    q25, q75 = np.percentile(values, [25, 75])
    return {
        "median": statistics.median(values),
        "q25": float(q25),
        "q75": float(q75),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# --------------------------------------------------------------------------------------------
# 2. TPE against random search on a cheap, real task
# --------------------------------------------------------------------------------------------
class CheapTask:
    """A small MVTCAE on mfeat, trained in-process; the objective is validation joint NLL."""

    def __init__(
        self,
        dataset_dir: Path,
        steps: int,
        batch_size: int,
        latent_dim: int,
        nll_K: int,
        val_rows: int,
    ) -> None:
        from mvtcae.data import load_manifest
        from mvtcae.evaluation.split import load_eval_split

        self.manifest = load_manifest(dataset_dir)
        train = load_eval_split(dataset_dir, "train")
        order = np.random.default_rng(0).permutation(len(train))
        self.val = train.take(np.sort(order[:val_rows]))
        self.train = train.take(np.sort(order[val_rows:]))
        self.steps, self.batch_size, self.latent_dim, self.nll_K = (
            steps,
            batch_size,
            latent_dim,
            nll_K,
        )

    def objective(self, alpha: float, beta: float, lr: float, seed: int = 0) -> float:
        """Train with these weights and return the validation joint NLL per sample."""
        import torch

        from mvtcae import MVTCAE
        from mvtcae.config import EvaluationSection, ModelSection
        from mvtcae.evaluation.likelihood import joint_nll
        from mvtcae.training import model_config_for

        torch.manual_seed(seed)
        section = ModelSection(
            latent_dim=self.latent_dim, alpha=alpha, beta=beta, decoder_scale=1.0
        )
        model = MVTCAE(model_config_for(section, self.manifest))
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        rng = np.random.default_rng(seed)
        model.train()
        for _ in range(self.steps):
            batch = self.train.batch(rng.choice(len(self.train), self.batch_size, replace=False))
            optimizer.zero_grad(set_to_none=True)
            model(batch).loss.backward()
            optimizer.step()
        model.eval()
        cfg = EvaluationSection(
            nll_K=self.nll_K,
            nll_batch_size_K=self.nll_K,
            nll_max_samples=len(self.val),
            nll_subsets_per_size=0,
        )
        with torch.no_grad():
            return joint_nll(model, self.val, cfg, "cpu")[0]["eval/joint_nll"]


def run_study(task: CheapTask, sampler: str, seed: int, budget: int, startup: int) -> list[float]:
    """One Optuna study of ``budget`` trials; returns the objective values in trial order."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    chosen = (
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
        if sampler == "tpe"
        else optuna.samplers.RandomSampler(seed=seed)
    )
    study = optuna.create_study(direction="minimize", sampler=chosen)

    def objective(trial: optuna.Trial) -> float:
        value = task.objective(
            trial.suggest_float("model.alpha", 0.0, 1.0),
            trial.suggest_float("model.beta", 0.1, 10.0, log=True),
            trial.suggest_float("train.optimizer.lr", 3e-4, 1e-2, log=True),
        )
        return value if math.isfinite(value) else 1e12

    study.optimize(objective, n_trials=budget)
    return [t.value for t in study.trials]


def best_so_far(values: list[float]) -> list[float]:
    """Running minimum."""
    return list(np.minimum.accumulate(np.asarray(values, dtype=float)))


def compare_samplers(task: CheapTask, seeds: int, budget: int, startup: int) -> dict[str, Any]:
    """TPE and random at equal budget over ``seeds`` seeds; best-so-far spreads at checkpoints."""
    runs: dict[str, list[list[float]]] = {"tpe": [], "random": []}
    started = time.perf_counter()
    for seed in range(seeds):
        for sampler in runs:
            values = run_study(task, sampler, seed, budget, startup)
            runs[sampler].append(values)
            print(
                f"[bench_tune] seed {seed} {sampler:6s} best {min(values):.3f}  "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    marks = sorted({m for m in (5, 10, budget // 2, budget) if 1 <= m <= budget})
    table = {
        sampler: {str(m): _spread([best_so_far(v)[m - 1] for v in values]) for m in marks}
        for sampler, values in runs.items()
    }
    wins = sum(min(t) < min(r) for t, r in zip(runs["tpe"], runs["random"], strict=True))
    return {
        "budget": budget,
        "seeds": seeds,
        "tpe_startup_trials": startup,
        "best_so_far": table,
        "tpe_wins": wins,
        "values": runs,
        "wall_s": time.perf_counter() - started,
    }


# --------------------------------------------------------------------------------------------
def _print_overhead(report: dict[str, Any]) -> None:
    print(
        f"\nTune overhead, sweep {report['study']} ({len(report['trials'])} trials, "
        f"max_concurrent {report['max_concurrent']})"
    )
    print(f"  sweep wall time         {report['sweep_wall_s']:.1f} s")
    print(f"  summed trial time       {report['summed_trial_s']:.1f} s")
    print(f"  wall / (summed / conc.) {report['wall_over_ideal']:.2f}")
    print(f"  share of trial time in epochs {report['epoch_fraction']:.1%}")
    for key in ("fixed_per_trial_s", "epoch_per_trial_s"):
        s = report[key]
        print(
            f"  {key:22s} median {s['median']:.1f}  IQR [{s['q25']:.1f}, {s['q75']:.1f}]  n={s['n']}"
        )


def _print_search(report: dict[str, Any]) -> None:
    print(
        f"\nTPE ({report['tpe_startup_trials']} random start-up trials) vs random, budget "
        f"{report['budget']}, {report['seeds']} seeds (best validation joint NLL so far; "
        "median [IQR])"
    )
    for sampler, marks in report["best_so_far"].items():
        cells = "  ".join(
            f"@{m}: {s['median']:.2f} [{s['q25']:.2f}, {s['q75']:.2f}]" for m, s in marks.items()
        )
        print(f"  {sampler:6s} {cells}")
    print(f"  TPE better than random in {report['tpe_wins']}/{report['seeds']} seeds")


def main(argv: list[str] | None = None) -> None:
    """Run the requested parts; write outputs/bench_tune/bench_tune_<part>.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, help="tune YAML whose sweep to measure")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--run-sweep", action="store_true", help="run the sweep first")
    parser.add_argument("--search", action="store_true", help="TPE vs random on the cheap task")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--budget", type=int, default=20)
    parser.add_argument("--startup", type=int, default=5, help="TPE's random start-up trials")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dataset", type=Path, default=Path("data/mfeat"))
    args = parser.parse_args(argv)
    if not (args.sweep or args.search):
        args.search = True
    import torch

    torch.set_num_threads(1)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    if args.sweep:
        from mvtcae.config import load_sweep_config
        from mvtcae.sweep import run_sweep

        spec = load_sweep_config(args.sweep, args.overrides)
        if args.run_sweep:
            run_sweep(spec)
        report["overhead"] = sweep_overhead(spec)
        _print_overhead(report["overhead"])
    if args.search:
        if not (args.dataset / "manifest.json").is_file():
            from mvtcae.data import prepare_mfeat

            prepare_mfeat(args.dataset)
        task = CheapTask(
            args.dataset.resolve(),
            steps=args.steps,
            batch_size=args.batch_size,
            latent_dim=16,
            nll_K=32,
            val_rows=400,
        )
        report["search"] = compare_samplers(task, args.seeds, args.budget, args.startup)
        _print_search(report["search"])
    for part, body in report.items():
        path = OUT_DIR / f"bench_tune_{part}.json"
        path.write_text(json.dumps(body, indent=2, default=float))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
