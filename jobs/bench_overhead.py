"""Where the wall time of a whole training job and of a sweep's trials goes, phase by phase.

Each repeat runs a fresh process, as ``mvtcae train`` / ``ray job submit`` would, on its own
storage and MLflow store (under ``outputs/bench_overhead/``), and times:

    process start      spawn -> the job's first line (interpreter start-up)
    imports            the platform's modules (torch, Ray, MLflow, ...)
    dataset            reading the manifest (preparing a built-in dataset if missing)
    ray_start          starting (or joining) Ray, the shared-path check
    run_setup          the MLflow run, its config and dataset input, the run-state index
    validation         dataset validation (a full re-hash, or the record of an earlier one)
    dataset_open       Ray Data datasets (materialised ones are read here)
    fit: outside epochs  worker-group start and shutdown (trainer.fit - what the epochs measure)
    epochs: data start the wait for each epoch's first batch (Ray Data start-up)
    epochs: training   the training steps
    epochs: validation per-epoch validation loss
    epochs: objectives a trial's per-epoch objective measures (sweeps only)
    epochs: checkpoint saving the checkpoint and ray.train.report (rank 0)
    epochs: images     the per-epoch reconstruction grids (rank 0, image modalities)
    evaluation         the final evaluation task
    mlflow_evaluation  logging the evaluation and its plots
    registration       logging the model and registering it
    exit               after train() returned: Ray and MLflow shutdown, interpreter exit

The sweep part runs ``--trials`` trials of ``--tune-config`` once and reports, per trial, the
same phases from the trials' MLflow child runs, the overhead (trial wall - time in epochs) and
the sweep's wall / (summed trial time / concurrency).

    python jobs/bench_overhead.py --repeats 3                       # both parts
    python jobs/bench_overhead.py --repeats 3 --part train --set train.epochs=30
    python jobs/bench_overhead.py --part sweep --sweep-baseline-set tune.trials_in_process=false
"""

from __future__ import annotations

import time

SPAWNED_ENV = "MVTCAE_BENCH_SPAWNED_AT"
MAIN_STARTED = time.time()  # before any heavy import: the end of the interpreter's start-up

import argparse  # noqa: E402 - after the first timestamp on purpose
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "outputs" / "bench_overhead"
PHASES = [
    "process_start",
    "imports",
    "dataset",
    "ray_start",
    "run_setup",
    "validation",
    "dataset_open",
    "fit_outside_epochs",
    "epochs_data_start",
    "epochs_training",
    "epochs_validation",
    "epochs_objectives",
    "epochs_checkpoint_report",
    "epochs_images",
    "evaluation",
    "mlflow_evaluation",
    "registration",
    "exit",
    "total",
]
EPOCH_METRICS = (
    "perf/epoch_time_s",
    "perf/train_time_s",
    "perf/first_batch_s",
    "perf/objectives_time_s",
    "perf/report_s",
    "perf/images_s",
)


def _isolated(root: Path, name: str, store: Path | None = None) -> list[str]:
    """Overrides that give a job its own run storage and model name, and an MLflow store
    (``store``, shared by the repeats: a store exists already on every run but a user's first)."""
    store = store or root
    return [
        f"train.storage_path={root / 'ray_results'}",
        f"tracking.tracking_uri=sqlite:///{store / 'mlflow.db'}",
        f"tracking.artifact_location={store / 'mlartifacts'}",
        f"tracking.registered_model_name={name}",
    ]


def _run_logged(command: list[str], log: Path, verbose: bool, **kwargs: Any) -> None:
    """Run a child job; its output goes to ``log`` (and the screen with ``verbose``)."""
    if verbose:
        subprocess.run(command, check=True, cwd=REPO, **kwargs)
        return
    with log.open("wb") as handle:
        done = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode:
        raise SystemExit(f"{command[1:4]} failed ({done.returncode}); its output: {log}")


def _epoch_sums(client: Any, run_id: str) -> dict[str, float]:
    sums = {}
    for key in EPOCH_METRICS:
        history = client.get_metric_history(run_id, key)
        sums[key] = sum(m.value for m in history)
        sums["epochs"] = max(sums.get("epochs", 0), len(history))
    return sums


def _breakdown(phases: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    """The table's phases from the driver's (or trial's) phases and the per-epoch sums."""
    epoch, train = sums["perf/epoch_time_s"], sums["perf/train_time_s"]
    first, objectives = sums["perf/first_batch_s"], sums["perf/objectives_time_s"]
    out = {
        k: phases.get(k, 0.0)
        for k in (
            "dataset",
            "ray_start",
            "run_setup",
            "validation",
            "dataset_open",
            "evaluation",
            "mlflow_evaluation",
            "registration",
        )
    }
    reports, images = sums["perf/report_s"], sums["perf/images_s"]
    out["fit_outside_epochs"] = (
        phases.get("trainer_fit", 0.0) - epoch - objectives - reports - images
    )
    out["epochs_checkpoint_report"] = reports
    out["epochs_images"] = images
    out["epochs_data_start"] = first
    out["epochs_training"] = train - first
    out["epochs_validation"] = epoch - train
    out["epochs_objectives"] = objectives
    return out


# ------------------------------------------------------------------- child: one training job
def child_train(config: str, overrides: list[str], out: Path) -> None:
    """One whole training job in this process; its phases go to ``out`` as JSON."""
    spawned = float(os.environ.get(SPAWNED_ENV, MAIN_STARTED))
    start = time.time()
    from mvtcae.config import load_config
    from mvtcae.tracking import client_for
    from mvtcae.training import train

    imported = time.time()
    cfg = load_config(config, overrides)
    result = train(cfg)
    row = {"process_start": MAIN_STARTED - spawned, "imports": imported - start}
    row |= _breakdown(result.phases, _epoch_sums(client_for(cfg.tracking), result.run_id))
    row["driver_total"] = result.wall_time_s
    row["finished_at"] = time.time()
    out.write_text(json.dumps(row))


def run_train_repeat(
    args: argparse.Namespace, index: int, source: Path | None = None
) -> dict[str, float]:
    """One training job in a fresh process; ``source`` runs another checkout's ``platform/``
    (its modules first on PYTHONPATH, which Ray's workers inherit)."""
    root = OUT_DIR / f"train-{'baseline-' if source else ''}{index}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = root / "phases.json"
    overrides = [*args.overrides, *_isolated(root, "bench-overhead", OUT_DIR / "store")]
    command = [sys.executable, __file__, "--child-train", args.train_config, "--out", str(out)]
    command += [arg for o in overrides for arg in ("--set", o)]
    spawned = time.time()
    env = _checkout_env(source) | {SPAWNED_ENV: str(spawned)}
    _run_logged(command, root / "job.log", args.verbose, env=env)
    ended = time.time()
    row = json.loads(out.read_text())
    row["exit"] = ended - row.pop("finished_at")
    row["total"] = ended - spawned
    return row


# ------------------------------------------------------------------- the sweep
def _checkout_env(source: Path | None) -> dict[str, str]:
    """The environment of a child job; ``source`` runs another checkout's ``platform/`` (its
    modules first on PYTHONPATH, which Ray's workers inherit)."""
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(source / "platform"), os.environ.get("PYTHONPATH")])
        )
    return env


def run_sweep_once(
    args: argparse.Namespace,
    extra: list[str] | None = None,
    name: str = "sweep",
    source: Path | None = None,
) -> dict[str, Any]:
    """Run the shrunk sweep (with ``extra`` overrides, from checkout ``source``) in a child
    process, then read its trials' phases from MLflow."""
    root = OUT_DIR / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    overrides = [
        f"tune.num_samples={args.trials}",
        f"tune.storage=sqlite:///{root / 'optuna.db'}",
        "tune.asha.enabled=false",
        *args.tune_overrides,
        *(extra or []),
        *_isolated(root, f"bench-overhead-{name}"),
    ]
    command = [sys.executable, "-m", "mvtcae.cli", "tune", "--config", args.tune_config]
    command += [arg for o in overrides for arg in ("--set", o)]
    spawned = time.time()
    _run_logged(command, root / "job.log", args.verbose, env=_checkout_env(source))
    process_wall = time.time() - spawned

    from bench_tune import sweep_overhead
    from mvtcae.config import load_sweep_config
    from mvtcae.tracking import client_for

    spec = load_sweep_config(args.tune_config, overrides)
    report = sweep_overhead(spec)
    client = client_for(spec.experiment.tracking)
    rows = []
    for trial in report["trials"]:
        run = client.get_run(_trial_run_id(spec, trial["trial"]))
        phases = {
            k.removeprefix("time/").removesuffix("_s"): v
            for k, v in run.data.metrics.items()
            if k.startswith("time/")
        }
        row = _breakdown(phases, _epoch_sums(client, run.info.run_id))
        # The trial's own clock: Tune's time_total_s stops at the last report, before the
        # trial's final evaluation.
        wall = phases.get("trial_total", trial["time_s"])
        row["tune_time_total"] = trial["time_s"]
        row["trial_wall"] = wall
        row["overhead"] = wall - trial["epoch_s"] - row["epochs_objectives"]
        row["overhead_with_objectives"] = wall - trial["epoch_s"]
        rows.append(row)
    summed = sum(r["trial_wall"] for r in rows)
    ideal = summed / spec.tune.max_concurrent
    report["wall_over_ideal_trial_clock"] = report["sweep_wall_s"] / ideal if ideal else math.nan
    return {"process_wall_s": process_wall, "overhead": report, "trials": rows}


def _trial_run_id(spec: Any, trial_id: str) -> str:
    from ray.tune import ExperimentAnalysis

    for trial in ExperimentAnalysis(spec.experiment_dir).trials:
        if trial.trial_id == trial_id:
            return trial.last_result["mlflow_run_id"]
    raise KeyError(trial_id)


# ------------------------------------------------------------------- report
def spread(values: list[float]) -> dict[str, float]:
    """Median, min and max of the values (NaN when there are none)."""
    if not values:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def table(rows: list[dict[str, float]], names: list[str]) -> str:
    """One line per phase: median and [min, max] over the rows, and its share of the total."""
    total = statistics.median(r.get("total", r.get("trial_wall", math.nan)) for r in rows)
    lines = [f"  {'phase':22s} {'median s':>9s}  {'[min, max]':>17s}  share"]
    for name in names:
        values = [r[name] for r in rows if name in r]
        if not values:
            continue
        s = spread(values)
        lines.append(
            f"  {name:22s} {s['median']:9.2f}  [{s['min']:6.2f}, {s['max']:6.2f}]  "
            f"{s['median'] / total:5.1%}"
        )
    return "\n".join(lines)


def compare(before: list[dict[str, float]], after: list[dict[str, float]], names: list[str]) -> str:
    """One line per phase: the baseline's and this checkout's median [min, max], and the ratio."""
    lines = [f"  {'phase':22s} {'baseline s':>22s}  {'this checkout s':>22s}  after/before"]
    for name in names:
        a, b = (
            spread([r[name] for r in before if name in r]),
            spread([r[name] for r in after if name in r]),
        )
        if not a["n"]:
            continue
        ratio = b["median"] / a["median"] if a["median"] > 0.005 else math.nan
        lines.append(
            f"  {name:22s} {a['median']:7.2f} [{a['min']:6.2f},{a['max']:6.2f}]  "
            f"{b['median']:7.2f} [{b['min']:6.2f},{b['max']:6.2f}]  {ratio:8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["train", "sweep", "both"], default="both")
    parser.add_argument("--repeats", type=int, default=3, help="training jobs to time")
    parser.add_argument("--train-config", default="jobs/configs/demo.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override for the training job (repeatable)",
    )
    parser.add_argument("--tune-config", default="jobs/configs/tune_mfeat.yaml")
    parser.add_argument("--tune-set", dest="tune_overrides", action="append", default=[])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument(
        "--sweep-baseline-set",
        dest="sweep_baseline",
        action="append",
        default=[],
        help="run the sweep first with these overrides as well "
        "(repeatable), for a side-by-side table of the trials' phases",
    )
    parser.add_argument("--verbose", action="store_true", help="show the jobs' own output")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of an older commit) whose "
        "training jobs alternate with this one's (and whose sweep runs before this one's), "
        "for a side-by-side table",
    )
    parser.add_argument("--child-train", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_train:
        child_train(args.child_train, args.overrides, args.out)
        return
    shutil.rmtree(OUT_DIR / "store", ignore_errors=True)
    (OUT_DIR / "store").mkdir(parents=True)
    report: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "argv": sys.argv[1:]}
    if args.part in ("train", "both"):
        rows, baseline = [], []
        for i in range(args.repeats):  # alternated, so that drifts in load hit both alike
            if args.baseline:
                baseline.append(run_train_repeat(args, i, args.baseline.resolve()))
            rows.append(run_train_repeat(args, i))
        report["train"] = {
            "rows": rows,
            "phases": {p: spread([r[p] for r in rows if p in r]) for p in PHASES},
        }
        print(f"training job ({args.train_config}, {args.repeats} runs, one process each):")
        print(table(rows, PHASES))
        if baseline:
            report["train"]["baseline"] = {"source": str(args.baseline), "rows": baseline}
            print(f"\nbaseline {args.baseline} against this checkout:")
            print(compare(baseline, rows, PHASES))
    if args.part in ("sweep", "both"):
        trial_phases = [p for p in PHASES if p not in ("process_start", "imports", "exit", "total")]
        trial_phases += ["overhead", "overhead_with_objectives", "tune_time_total", "trial_wall"]
        before = None
        if args.sweep_baseline or args.baseline:
            source = args.baseline.resolve() if args.baseline else None
            before = run_sweep_once(args, args.sweep_baseline, "sweep-baseline", source)
            report["sweep_baseline"] = before | {
                "overrides": args.sweep_baseline,
                "source": str(source or REPO),
            }
        sweep = run_sweep_once(args)
        report["sweep"] = sweep
        print(f"\nsweep trials ({args.tune_config}, {len(sweep['trials'])} trials):")
        print(table(sweep["trials"], trial_phases))
        for label, run in (("baseline", before), ("this run", sweep)):
            if run is None:
                continue
            o = run["overhead"]
            summed = sum(r["trial_wall"] for r in run["trials"])
            print(
                f"  {label}: sweep wall {o['sweep_wall_s']:.1f} s; summed trial walls "
                f"{summed:.1f} s; wall / (summed / {o['max_concurrent']}) = "
                f"{o['wall_over_ideal_trial_clock']:.2f} ({o['wall_over_ideal']:.2f} by "
                f"Tune's time_total_s)"
            )
        if before is not None:
            print(
                f"\nsweep trials: baseline ({args.baseline or 'this checkout'}, "
                f"{args.sweep_baseline or 'no overrides'}) against this checkout:"
            )
            print(compare(before["trials"], sweep["trials"], trial_phases))
    path = OUT_DIR / "bench_overhead.json"
    path.write_text(json.dumps(report, indent=2, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
