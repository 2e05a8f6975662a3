"""The sweep driver: MLflow parent run, Tuner (new or restored), study artifacts, registration.

`run_sweep` starts one MLflow parent run, a Ray Tune ``Tuner`` whose trials each run the
platform's Ray Train training (`mvtcae.sweep.trial`), a searcher over an Optuna study in an RDB
storage (`mvtcae.sweep.study`), and ASHA on epochs. At the end the study's plots are logged and
the best trial's model goes through the registry's promotion gate.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from ray import tune
from ray.tune import Tuner
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from mvtcae import storage, tracking
from mvtcae.config import ConfigError, SweepSpec, trial_eval_config
from mvtcae.config.sweep import SWEEP_STATE_FILE, trials_in_process
from mvtcae.safety.redaction import redact, redact_text
from mvtcae.safety.values import is_number
from mvtcae.storage.checkpoints import MODEL_FILES
from mvtcae.sweep import study as sweep_study
from mvtcae.sweep.trial import INTERRUPTED_TAG, PARENT_TAG, SWEEP_TAG, SweepContext, run_trial
from mvtcae.tracking.run_logger import SPOOL_DIR, flush_spools, retry_until
from mvtcae.training import (
    check_capacity,
    check_dataset,
    ensure_cluster,
    prepare_dataset,
    scaling_config,
    val_split_name,
)
from mvtcae.training.loop import RUN_ID_KEY
from mvtcae.training.run_console import sweep_console, tune_verbosity

logger = logging.getLogger(__name__)

PARENT_ROLE_TAG = "mvtcae.tune.role"
TRAIN_RUNS = "train_runs"


@dataclass
class SweepResult:
    """What a sweep produced."""

    study_name: str
    storage: str
    experiment_dir: str
    parent_run_id: str
    tracking_uri: str
    finished: bool
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    pareto_front: list[dict[str, Any]] = field(default_factory=list)
    registered: Any = None
    artifacts: dict[str, str] = field(default_factory=dict)
    wall_time_s: float = 0.0
    trial_time_s: float = 0.0


def run_sweep(spec: SweepSpec, *, resume: bool | None = None) -> SweepResult:
    """Run (or resume) the sweep; return the trials, best trial, Pareto front and registry outcome."""
    resume = spec.tune.resume if resume is None else resume
    started = time.perf_counter()
    spec = _with_resolved_tracking(spec)
    check_capacity(spec.experiment.train)  # one trial must fit; Tune queues the others
    check_sweep_state(spec, resume)
    dataset_dir, manifest = prepare_dataset(spec.experiment)
    check_dataset(spec.experiment, dataset_dir, manifest)
    ensure_cluster(spec.experiment, dataset_dir)
    study_storage = sweep_study.open_storage(spec.tune.storage)
    parent_run_id = _open_parent_run(spec, resume)
    context = _context(spec, dataset_dir, manifest, parent_run_id)
    with sweep_console(spec, parent_run_id):  # header; the sweep's log, Tune's lines in it
        grid = _tuner(spec, context, study_storage, resume).fit()
    study = optuna.load_study(study_name=spec.study_name, storage=study_storage)
    finished = sweep_study.sweep_done(
        study, spec.tune.num_samples, spec.tune.max_infra_replacements
    )
    if finished:
        sweep_study.fail_orphans(study)
    _flush_trial_spools(spec)
    _with_tracking(
        spec, lambda: _close_child_runs(spec, grid, finished, parent_run_id), "closing trial runs"
    )
    result = SweepResult(
        study_name=spec.study_name,
        storage=spec.tune.storage,
        experiment_dir=spec.experiment_dir,
        parent_run_id=parent_run_id,
        tracking_uri=str(spec.experiment.tracking.tracking_uri),
        finished=finished,
        trials=sweep_study.trial_rows(study),
        pareto_front=sweep_study.pareto_front(study),
        trial_time_s=_summed_trial_time(grid),
    )
    result.best = _best_with_checkpoint(spec, study, grid)
    result.artifacts = _with_tracking(
        spec, lambda: _log_study(spec, study, result), "logging the study"
    )
    if finished and result.best is not None and spec.tune.register_best:
        result.registered = _with_tracking(
            spec, lambda: _register(spec, result.best), "registering the best trial's model"
        )
    result.wall_time_s = time.perf_counter() - started
    _with_tracking(spec, lambda: _close_parent_run(spec, result), "closing the parent run")
    return result


def _with_tracking(spec: SweepSpec, call: Any, what: str) -> Any:
    """``call()``, retried while MLflow is unreachable (tracking.outage_grace_s)."""
    return retry_until(call, what, spec.experiment.tracking.outage_grace_s)


def _flush_trial_spools(spec: SweepSpec) -> None:
    """Send metrics that trials kept while MLflow was unreachable (see RunLogger)."""
    runs_dir = storage.join(spec.experiment_dir, TRAIN_RUNS)
    uri = str(spec.experiment.tracking.tracking_uri)
    for name in storage.list_dirs(runs_dir):
        unsent = flush_spools(
            storage.join(runs_dir, name, SPOOL_DIR), uri, spec.experiment.tracking.outage_grace_s
        )
        if unsent:
            logger.warning(
                "%d metric values of %s could not be sent to MLflow; kept in %s",
                unsent,
                name,
                storage.join(runs_dir, name, SPOOL_DIR),
            )


def _with_resolved_tracking(spec: SweepSpec) -> SweepSpec:
    """Pin the tracking URI once: trials run in Ray session directories, not here."""
    uri = tracking.resolve_tracking_uri(spec.experiment.tracking)
    experiment = spec.experiment.model_copy(deep=True)
    experiment.tracking = experiment.tracking.model_copy(update={"tracking_uri": uri})
    return SweepSpec(experiment=experiment, tune=spec.tune, source=spec.source)


def check_sweep_state(spec: SweepSpec, resume: bool) -> None:
    """Refuse to start over an existing sweep, or to resume one that is not there."""
    exp_dir = spec.experiment_dir
    exists = storage.is_file(storage.join(exp_dir, SWEEP_STATE_FILE))
    if resume and not (exists and Tuner.can_restore(exp_dir)):
        raise ConfigError(
            f"--resume: no sweep to resume at {exp_dir} (tune.study_name {spec.study_name!r}); "
            "run it once without --resume"
        )
    if not resume and exists:
        raise ConfigError(
            f"a sweep named {spec.study_name!r} already exists at {exp_dir}: continue it with "
            "--resume, or choose another tune.study_name"
        )
    if not resume:
        _refuse_used_study(spec)


def _refuse_used_study(spec: SweepSpec) -> None:
    study_storage = sweep_study.open_storage(spec.tune.storage)
    names = {s.study_name for s in optuna.get_all_study_summaries(study_storage)}
    if spec.study_name in names:
        raise ConfigError(
            f"tune.study_name {spec.study_name!r} already exists in {spec.tune.storage} without a "
            f"sweep at {spec.experiment_dir}: choose another study name"
        )


def _open_parent_run(spec: SweepSpec, resume: bool) -> str:
    """Create (or reopen on resume) the sweep's MLflow parent run; return its id."""
    client = tracking.client_for(spec.experiment.tracking)
    state_file = storage.join(spec.experiment_dir, SWEEP_STATE_FILE)
    if resume:
        run_id = json.loads(storage.read_text(state_file))["parent_run_id"]
        client.update_run(run_id, status="RUNNING")
        client.set_tag(run_id, "mvtcae.tune.resumed_at", time.strftime("%Y-%m-%dT%H:%M:%S"))
        return run_id
    experiment_id = tracking.ensure_experiment(spec.experiment.tracking)
    tags = {
        SWEEP_TAG: spec.study_name,
        PARENT_ROLE_TAG: "sweep",
        "optuna.study_name": spec.study_name,
        "optuna.storage": redact_text(spec.tune.storage),
    }
    run_id = client.create_run(experiment_id, run_name=spec.study_name, tags=tags).info.run_id
    tracking.log_config(spec.experiment.to_dict(), run_id=run_id, tracking=spec.experiment.tracking)
    tune_params = tracking.flatten_config(redact(spec.tune.model_dump(mode="json")), prefix="tune.")
    for key, value in tune_params.items():
        client.log_param(run_id, key, value)
    client.log_text(run_id, yaml.safe_dump(redact(spec.to_dict()), sort_keys=False), "sweep.yaml")
    state = {
        "parent_run_id": run_id,
        "study_name": spec.study_name,
        "storage": redact_text(spec.tune.storage),
    }
    storage.write_text(state_file, json.dumps(state, indent=2))
    return run_id


def _context(spec: SweepSpec, dataset_dir: str, manifest: Any, parent_run_id: str) -> SweepContext:
    base = spec.experiment.to_dict()
    # Trials keep their latest checkpoints: the objective is measured on the reported epoch, so
    # the model that goes to the registry is the one whose value Optuna recorded.
    base["train"]["checkpoint"].update(metric="epoch", mode="max")
    base["train"]["storage_path"] = storage.join(spec.experiment_dir, TRAIN_RUNS)
    val = val_split_name(spec.experiment, manifest)
    return SweepContext(
        base_config=base,
        dataset_dir=str(dataset_dir),
        val_split=val,
        tracking_uri=str(spec.experiment.tracking.tracking_uri),
        experiment_id=tracking.ensure_experiment(spec.experiment.tracking),
        parent_run_id=parent_run_id,
        sweep_name=spec.study_name,
        epoch_eval=trial_eval_config(spec),
        objectives=tuple(spec.tune.metrics),
        final_eval=spec.tune.final_eval,
        tracking_grace_s=spec.experiment.tracking.outage_grace_s,
        infra_retries=spec.tune.infra_retries,
        in_process=trials_in_process(spec),
    )


def _tuner(spec: SweepSpec, context: SweepContext, study_storage: Any, resume: bool) -> Any:

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context), trial_resources(spec, context)
    )
    if resume:
        logger.info("resuming sweep %s from %s", spec.study_name, spec.experiment_dir)
        return tune.Tuner.restore(
            spec.experiment_dir, trainable, resume_unfinished=True, resume_errored=False
        )
    tune_config = tune.TuneConfig(
        search_alg=sweep_study.build_searcher(spec, study_storage),
        scheduler=_scheduler(spec),
        # Room for re-runs of trials that failed for infrastructure reasons; the searcher stops
        # suggesting once tune.num_samples trials have run on their merits.
        num_samples=spec.tune.num_samples + spec.tune.max_infra_replacements,
        max_concurrent_trials=spec.tune.max_concurrent,
        trial_dirname_creator=_trial_dirname,
        # An in-process trial's actor, with torch and the platform imported, trains the next
        # trial too (Tune resets it between trials): a process start and imports less each.
        reuse_actors=context.in_process,
    )
    run_config = tune.RunConfig(
        name=spec.study_name,
        storage_path=str(spec.experiment.train.storage_path),
        failure_config=tune.FailureConfig(max_failures=0),
        verbose=tune_verbosity(),  # status tables with --verbose; the header says the rest
    )
    return tune.Tuner(trainable, tune_config=tune_config, run_config=run_config)


def trial_resources(spec: SweepSpec, context: SweepContext) -> dict[str, float]:
    """What each trial's process holds: a token CPU when its training runs in a worker group
    of its own, else what the one training worker needs (its CPUs, and its GPU when used)."""
    if not context.in_process:
        return {"CPU": spec.tune.trial_cpus}
    worker = dict(scaling_config(spec.experiment.train).resources_per_worker or {})
    worker["CPU"] = max(float(worker.get("CPU", 1.0)), spec.tune.trial_cpus)
    return worker


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _scheduler(spec: SweepSpec) -> Any:
    """ASHA on epochs, on the first objective (Tune's schedulers take one metric).

    Its rungs lie strictly before the last epoch and it never stops a trial at ``max_t``: a
    trial stopped at its last report would lose its NaN check and final evaluation, and
    stopping it there saves nothing. With the grace period at the last epoch there is no rung
    left, so trials run first in, first out.
    """
    asha, epochs = spec.tune.asha, spec.experiment.train.epochs
    if not asha.enabled or asha.grace_period >= epochs:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",
        metric=spec.tune.metrics[0],
        mode=spec.tune.modes[0],
        max_t=epochs - 1,
        stop_last_trials=False,
        grace_period=asha.grace_period,
        reduction_factor=asha.reduction_factor,
        brackets=asha.brackets,
    )


def _close_child_runs(spec: SweepSpec, grid: Any, finished: bool, parent_run_id: str) -> None:
    """Trials that Tune stopped (ASHA) or cut short never ended their MLflow run: end it here,
    from each trial's result (its error, its last epoch) and whether the sweep finished. A run
    still open after that belongs to a trial cut before its first report: KILLED."""
    client = tracking.client_for(spec.experiment.tracking)
    epochs = spec.experiment.train.epochs
    for result in grid:
        metrics = result.metrics or {}
        run_id = metrics.get(RUN_ID_KEY)
        if not run_id or client.get_run(run_id).info.status != "RUNNING":
            continue
        epoch = int(metrics.get("epoch", 0))
        if result.error is not None:
            client.set_terminated(run_id, status="FAILED")
        elif not finished:  # cut, at the latest between its last epoch and its evaluation
            client.set_tag(run_id, INTERRUPTED_TAG, f"after epoch {epoch}")
            client.set_terminated(run_id, status="KILLED")
        else:
            if epoch < epochs:
                client.set_tag(run_id, "mvtcae.tune.early_stopped", f"after epoch {epoch} (ASHA)")
            client.set_terminated(run_id, status="FINISHED")
    parent = client.get_run(parent_run_id)
    still_open = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for run in still_open:
        client.set_tag(run.info.run_id, INTERRUPTED_TAG, "before its first epoch")
        client.set_terminated(run.info.run_id, status="KILLED")


def _summed_trial_time(grid: Any) -> float:
    total = 0.0
    for result in grid:
        value = (result.metrics or {}).get("time_total_s")
        if is_number(value) and math.isfinite(value):
            total += float(value)
    return total


def _best_with_checkpoint(spec: SweepSpec, study: Any, grid: Any) -> dict[str, Any] | None:
    """The best study trial joined with its Tune result's checkpoint and MLflow run."""
    row = sweep_study.best_row(study, spec.tune.modes)
    if row is None:
        return None
    by_trial = {r.metrics.get("trial_id"): r for r in grid if r.metrics}
    result = by_trial.get(row["tune_trial_id"])
    metrics = result.metrics if result is not None else {}
    fs_path = metrics.get("checkpoint_path")  # a path on the run storage's file system
    root = storage.join(spec.experiment_dir, TRAIN_RUNS)
    return {
        **row,
        "checkpoint": storage.location_of(root, fs_path) if fs_path else None,
        "mlflow_run_id": row["mlflow_run_id"] or metrics.get(RUN_ID_KEY),
        "epoch": metrics.get("epoch"),
    }


def _log_study(spec: SweepSpec, study: Any, result: SweepResult) -> dict[str, str]:
    """Save the study's plots, trials and front under the sweep dir and in the parent run;
    return their storage locations."""
    location = storage.join(spec.experiment_dir, "study")
    client = tracking.client_for(spec.experiment.tracking)
    with storage.staged_directory(location) as out_dir:
        files = sweep_study.save_study_plots(study, spec.tune.metrics, out_dir)
        for name, rows in (("trials", result.trials), ("pareto_front", result.pareto_front)):
            files[name] = out_dir / f"{name}.json"
            files[name].write_text(json.dumps(rows, indent=2, default=str))
        for path in files.values():
            client.log_artifact(result.parent_run_id, str(path), artifact_path="study")
    return {name: storage.join(location, Path(path).name) for name, path in files.items()}


def _register(spec: SweepSpec, best: dict[str, Any]) -> Any:
    """The best trial's checkpoint through the registry's promotion gate."""
    if not best.get("checkpoint") or not best.get("mlflow_run_id"):
        logger.warning("best trial %s has no checkpoint: nothing to register", best["number"])
        return None
    if not spec.experiment.tracking.log_model:
        return None
    with storage.local_directory(best["checkpoint"], files=MODEL_FILES) as checkpoint_dir:
        return tracking.log_model_and_register(
            checkpoint_dir, spec.experiment.tracking, None, best["mlflow_run_id"]
        )


def _close_parent_run(spec: SweepSpec, result: SweepResult) -> None:
    client = tracking.client_for(spec.experiment.tracking)
    run_id = result.parent_run_id
    counts = dict.fromkeys(("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING"), 0)
    for row in result.trials:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    for state, n in counts.items():
        client.log_metric(run_id, f"sweep/trials_{state.lower()}", n)
    client.log_metric(run_id, "sweep/wall_time_s", result.wall_time_s)
    client.log_metric(run_id, "sweep/summed_trial_time_s", result.trial_time_s)
    client.log_metric(run_id, "sweep/pareto_front_size", len(result.pareto_front))
    if result.best is not None:
        client.set_tag(run_id, "best.trial_number", str(result.best["number"]))
        client.set_tag(run_id, "best.mlflow_run_id", str(result.best["mlflow_run_id"]))
        for metric, value in zip(spec.tune.metrics, result.best["values"], strict=True):
            client.log_metric(run_id, f"best/{metric}", value)
        for name, value in result.best["params"].items():
            client.set_tag(run_id, f"best.{name}", str(value))
    if result.registered is not None:
        reg = result.registered
        client.set_tag(run_id, "registered_model", f"{reg.name}/{reg.version} ({reg.alias})")
    client.set_tag(run_id, "mvtcae.tune.state", "finished" if result.finished else "interrupted")
    client.set_terminated(run_id, status="FINISHED" if result.finished else "KILLED")
