"""A run's life, the same for `mvtcae train` (`train`) and for a sweep trial
(`mvtcae.sweep.trial.run_trial`): open its MLflow run (or reopen it on resume) and log its config
and dataset lineage (`open_run`, `log_run_inputs`), fit it through its host, a Ray Train worker
group or this process (`fit`), evaluate a checkpoint in this process or in a Ray task
(`evaluate_run`), record and register the result, and close the run by how its block ended
(`closing`): FINISHED, FAILED with the redacted error in its error tag, or KILLED for an interrupt.

``train`` runs one: it prepares the dataset, connects to Ray, fits a ``TorchTrainer`` whose workers
run `mvtcae.training.loop`, evaluates the best intact checkpoint with `mvtcae.evaluation` (in the
driver when the cluster is the local Ray it started, else in a Ray task, on a GPU when training
had one), and hands it to the registry's promotion gate. An interrupt (SIGINT, SIGTERM) stops
the run's workers and ends the run KILLED.

One module, over 400 lines: it is the one place that owns a run's life, from opening its MLflow
run to closing it, for `train` and every sweep trial alike.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from mvtcae import storage, tracking
from mvtcae.config import EvaluationSection, ExperimentConfig, TrainSection
from mvtcae.evaluation import evaluate_checkpoint
from mvtcae.evaluation.suite import CheckpointEvaluation
from mvtcae.model.errors import Interrupted
from mvtcae.safety.redaction import redact_text
from mvtcae.safety.values import is_number
from mvtcae.storage import ray_session, runs
from mvtcae.storage.checkpoints import CHECKSUMS, MODEL_FILES, verify_checkpoint
from mvtcae.tracking import dataset_lineage as lineage
from mvtcae.tracking.mlflow_runs import ERROR_TAG
from mvtcae.tracking.run_logger import (
    SPOOL_DIR,
    RunLogger,
    flush_spools,
    mlflow_client,
    retry_until,
)
from mvtcae.training.loop import train_in_process
from mvtcae.training.phases import PhaseTimes, timed
from mvtcae.training.plan import FitPlan, plan_loop
from mvtcae.training.preflight import (
    check_capacity,
    check_dataset,
    ensure_cluster,
    prepare_dataset,
    run_to_resume,
)
from mvtcae.training.run_console import run_console
from mvtcae.training.stop_record import clear_stop_record, raise_for_stop, read_stop_record
from mvtcae.training.trainer import evaluation_task, fit_in_thread, ranked_checkpoints, trainer_for

logger = logging.getLogger(__name__)

RUN_STATE_FILE = runs.RUN_STATE_FILE
EVAL_HOST_TAG = "mvtcae.eval.host"
"""MLflow tag: where the run's final evaluation ran ("driver" or "ray task")."""


# ------------------------------------------------------------------------------ the MLflow run
@dataclass
class TrackedRun:
    """An open MLflow run of a training run, and how it is written to and closed.

    ``active``: the process's active MLflow run (`mvtcae train`, opened by `open_run`); else a
    run written through ``tracker`` (a sweep trial's child run, whose metrics and tags a
    `RunLogger` keeps through a tracking outage).
    """

    run_id: str
    name: str
    tracking_uri: str
    active: bool = False
    tracker: RunLogger | None = None
    error_tag: str = ERROR_TAG
    """The tag that records the (redacted) error a run failed with (an active run's is always
    ``mvtcae.error``, which `tracking.end_run_after_error` sets and a resume drops)."""
    finished_before: bool = False
    """An earlier attempt finished the run (a resumed sweep's trial): its state stands."""


def open_run(
    cfg: ExperimentConfig,
    run_name: str,
    dataset_dir: str,
    manifest: Any,
    resumed: runs.RunRecord | None = None,
) -> TrackedRun:
    """Reopen the resumed run's MLflow run (its error tag dropped), or start one with the config
    and dataset logged, as this process's active run."""
    grace, uri = cfg.tracking.outage_grace_s, tracking.resolve_tracking_uri(cfg.tracking)
    if resumed is not None:
        retry_until(
            lambda: tracking.start_run(cfg.tracking, run_id=resumed.mlflow_run_id),
            "reopening the MLflow run",
            grace,
        )
        return TrackedRun(resumed.mlflow_run_id, run_name, uri, active=True)
    started = retry_until(
        lambda: tracking.start_run(cfg.tracking, run_name=run_name),
        "starting the MLflow run",
        grace,
    )
    run = TrackedRun(started.info.run_id, run_name, uri, active=True)
    try:
        log_run_inputs(cfg, run.run_id, dataset_dir, manifest)
    except BaseException as err:
        close_run(run, err)
        raise
    return run


def log_run_inputs(cfg: ExperimentConfig, run_id: str, dataset_dir: str, manifest: Any) -> None:
    """The run's config (flattened params and the file) and its dataset's lineage."""
    grace = cfg.tracking.outage_grace_s
    retry_until(
        lambda: tracking.log_config(cfg.to_dict(), run_id=run_id, tracking=cfg.tracking),
        "logging the config",
        grace,
    )
    client = tracking.client_for(cfg.tracking)
    retry_until(
        lambda: lineage.log_dataset(client, run_id, manifest, dataset_dir),
        "logging the dataset",
        grace,
    )


@contextmanager
def closing(
    run: TrackedRun,
    *,
    on_interrupt: Callable[[], None] | None = None,
    leave_open_on: tuple[type[BaseException], ...] = (),
) -> Iterator[TrackedRun]:
    """Close ``run`` by how the block ends, and raise its error again: FINISHED; KILLED for an
    interrupt (after ``on_interrupt``, which stops what still writes to the run, and raised as
    `Interrupted` naming the run); FAILED, with the redacted error in ``run.error_tag``.

    An error in ``leave_open_on`` (a sweep trial that Tune stopped) leaves the run open for its
    owner to close. Only the block's own error leaves: a tracking failure while closing is
    logged.
    """
    try:
        yield run
    except leave_open_on:
        _flush(run)
        raise
    except KeyboardInterrupt as err:
        if on_interrupt is None:
            close_run(run, err)
            raise
        on_interrupt()  # first: nothing is logged to the run after it is marked KILLED
        close_run(run, err)
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        raise Interrupted(signum, run=f"{run.name} (MLflow run {run.run_id})") from err
    except BaseException as err:
        close_run(run, err)
        raise
    close_run(run)


def close_run(run: TrackedRun, error: BaseException | None = None) -> None:
    """End the run FINISHED (``error`` None), KILLED (an interrupt) or FAILED with the redacted
    error in its error tag; a run an earlier attempt finished keeps its state. A tracking
    failure here is logged, never raised over ``error``."""
    if run.active:
        if error is None:
            tracking.end_run()
        else:
            tracking.end_run_after_error(error)
        return
    if run.finished_before and error is None:
        _flush(run)
        return
    status = "FINISHED" if error is None else _error_status(error)
    if error is not None and run.tracker is not None:
        run.tracker.set_tags(
            {run.error_tag: redact_text(f"{type(error).__name__}: {error}")[:5000]}
        )
    _flush(run)
    try:
        mlflow_client(run.tracking_uri).set_terminated(run.run_id, status=status)
    except Exception as tracking_error:  # noqa: BLE001
        logger.warning(
            "could not mark MLflow run %s %s: %s", run.run_id, status, type(tracking_error).__name__
        )


def _error_status(error: BaseException) -> str:
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"


def _flush(run: TrackedRun) -> None:
    """Send what the run's tracker still holds (waiting a while only if MLflow was away)."""
    if run.tracker is not None:
        run.tracker.close(30.0 if run.tracker.pending else 0.0)


# --------------------------------------------------------------------- fit, evaluate: the hosts
def fit(
    cfg: ExperimentConfig,
    run_name: str,
    plan: FitPlan,
    *,
    in_process: bool = False,
    report_to_tune: bool = False,
    callbacks: list[Any] | None = None,
) -> Any:
    """Fit a planned run through its host: in this process (`train_in_process`, one worker),
    else with a Ray Train worker group; return the fit's result (``metrics``, ``checkpoint``).

    A worker group is fitted off the main thread when called on it (`fit_in_thread`), so that
    an interrupt reaches the caller as itself.
    """
    if in_process:
        return train_in_process(plan.loop, plan.datasets, report_to_tune=report_to_tune)
    trainer = trainer_for(cfg, run_name, plan, callbacks)
    if threading.current_thread() is threading.main_thread():
        return fit_in_thread(trainer)
    return trainer.fit()


def evaluate_run(
    candidates: Sequence[str],
    dataset_dir: str,
    eval_cfg: EvaluationSection,
    train_cfg: TrainSection,
    *,
    in_process: bool,
    out_location: str | None = None,
) -> CheckpointEvaluation:
    """`evaluate_checkpoint` with the CPUs (and the GPU) that training had: in this process when
    it holds them, else in a Ray task of its own (`evaluation_task`)."""
    task, cpus = evaluation_task(train_cfg)
    args = (list(candidates), str(dataset_dir), eval_cfg)
    if in_process:
        return evaluate_checkpoint(*args, out_location=out_location, threads=cpus)
    return ray.get(task.remote(*args, out_location=out_location, threads=cpus))


def raise_if_stopped(run_dir: str) -> None:
    """Raise the error the run's workers stopped on (NonFiniteError, CorruptCheckpointError),
    from the stop record they left in run storage; nothing when they ran to the end."""
    raise_for_stop(read_stop_record(run_dir))


# ---------------------------------------------------------------------------- `mvtcae train`
@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str | None
    run_name: str
    run_dir: str
    best_checkpoint: str | None
    final_metrics: dict[str, float]
    best_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    registered: Any = None
    tracking_uri: str | None = None
    wall_time_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds of the driver's phases (also logged to the run as ``time/<phase>_s``)."""
    candidates: list[str] = field(default_factory=list)
    trend_plot: str | None = None


def train(cfg: ExperimentConfig, *, resume: bool = False) -> TrainResult:
    """Train (or resume) a run, evaluate its best checkpoint and register it in MLflow.

    Once the MLflow run is open, any failure (storage, Ray, non-finite values, evaluation,
    registration, an interrupt) ends it as FAILED (KILLED for an interrupt) with the error
    recorded in its ``mvtcae.error`` tag, and is raised again.
    """
    started, phases = time.perf_counter(), PhaseTimes()
    with phases.phase("run_setup"):  # what can be refused in a second comes first
        check_capacity(cfg.train)
        found = run_to_resume(cfg) if resume else None
    with phases.phase("dataset"):
        dataset_dir, manifest = prepare_dataset(cfg)
    with phases.phase("run_setup"):
        check_dataset(cfg, dataset_dir, manifest, found)
    with phases.phase("ray_start"):
        ensure_cluster(cfg, dataset_dir)
    with phases.phase("run_setup"):
        run_name = found.name if found else runs.new_run_name(runs.run_prefix(cfg))
        run = open_run(cfg, run_name, dataset_dir, manifest, found)
    with closing(run, on_interrupt=_stop_ray_for_interrupt), run_console(cfg, run_name, run.run_id):
        with phases.phase("run_setup"):
            record = found or runs.create_run(
                cfg, run_name, run.run_id, manifest.digest(), dataset_dir
            )
        out = _fit_run(cfg, record, dataset_dir, manifest, run.tracking_uri, phases)
        if out.best_checkpoint is not None:
            _evaluate_and_register(cfg, out, dataset_dir, phases)
        out.wall_time_s = time.perf_counter() - started
        out.phases = dict(phases.seconds)
        timings = phases.as_metrics() | {"time/driver_total_s": out.wall_time_s}
        retry_until(
            lambda: tracking.log_metrics(timings, run_id=run.run_id, tracking=cfg.tracking),
            "logging the phase times",
            cfg.tracking.outage_grace_s,
        )
    return out


def _stop_ray_for_interrupt() -> None:
    """End the Train run of an interrupted driver: a local Ray it started is stopped whole, a
    cluster it connected to is left (which ends the run's actors, see `ray_session.shutdown`);
    a session the caller opened is the caller's to end."""
    if ray_session.connected_here():
        ray_session.shutdown()
    else:
        logger.warning(
            "interrupted: the Ray session is the caller's; its Train run stops when this "
            "process disconnects (ray.shutdown())"
        )


def _fit_run(
    cfg: ExperimentConfig,
    record: runs.RunRecord,
    dataset_dir: str,
    manifest: Any,
    tracking_uri: str,
    phases: PhaseTimes | None = None,
) -> TrainResult:
    """Plan and fit the run with a worker group; raise NonFiniteError (or CorruptCheckpointError)
    if the workers stopped on one."""
    plan = plan_loop(
        cfg, record.name, dataset_dir, manifest, record.mlflow_run_id, tracking_uri, phases=phases
    )
    clear_stop_record(record.location)
    with timed(phases, "trainer_fit"):
        result = fit(cfg, record.name, plan)
    unsent = flush_spools(
        storage.join(record.location, SPOOL_DIR), tracking_uri, cfg.tracking.outage_grace_s
    )
    if unsent:
        logger.warning(
            "%d metric values could not be sent to MLflow; they are kept in %s",
            unsent,
            storage.join(record.location, SPOOL_DIR),
        )
    raise_if_stopped(record.location)
    ranked = ranked_checkpoints(result, cfg.train, record.location)
    final = {k: float(v) for k, v in (result.metrics or {}).items() if is_number(v)}
    return TrainResult(
        run_id=record.mlflow_run_id,
        run_name=record.name,
        run_dir=record.location,
        best_checkpoint=ranked[0][0] if ranked else None,
        final_metrics=final,
        best_metrics=ranked[0][1] if ranked else {},
        tracking_uri=tracking_uri,
        candidates=[loc for loc, _ in ranked],
    )


def _evaluate_and_register(
    cfg: ExperimentConfig, out: TrainResult, dataset_dir: str, phases: PhaseTimes | None = None
) -> None:
    """Evaluate the best intact checkpoint, log, register: in this process when the cluster is
    the local Ray it started, else in a Ray task (on a GPU if training had one); the run's
    ``mvtcae.eval.host`` tag says which.

    The evaluation writes its report and plots to ``<run dir>/evaluation`` in run storage; the
    driver reads them back from there, so the task may run on any node.
    """
    eval_dir = storage.join(out.run_dir, "evaluation")
    # The cluster is this process's own local Ray and training has ended: evaluating here, on
    # the CPUs it freed, spares a task worker's start and imports (~3 s).
    here = ray_session.started_here()
    with timed(phases, "evaluation"):
        done = evaluate_run(
            out.candidates or [out.best_checkpoint],
            dataset_dir,
            cfg.eval,
            cfg.train,
            in_process=here,
            out_location=eval_dir,
        )
    for note in done.skipped:
        logger.warning("skipped corrupt checkpoint %s", note)
    out.best_checkpoint = done.checkpoint
    out.eval_metrics = {k: float(v) for k, v in done.report.metrics.items()}
    if "trend" in done.report.plots:
        relative = Path(done.report.plots["trend"]).relative_to(done.out_dir).as_posix()
        out.trend_plot = storage.join(eval_dir, relative)
    with timed(phases, "mlflow_evaluation"):
        _record_evaluation(cfg, out, done, eval_dir, "driver" if here else "ray task")
    if cfg.tracking.log_model:
        with timed(phases, "registration"):
            out.registered = _register(cfg, out, done.checkpoint)


def _record_evaluation(
    cfg: ExperimentConfig, out: TrainResult, done: CheckpointEvaluation, eval_dir: str, host: str
) -> None:
    """The evaluation's measures and plots (read back from run storage) on the run, and the
    tag that says where it ran."""
    grace, report, step = (
        cfg.tracking.outage_grace_s,
        done.report,
        int(out.final_metrics.get("epoch", 0)),
    )
    with storage.local_directory(eval_dir) as local_eval:
        report.plots = {
            k: local_eval / Path(p).relative_to(done.out_dir) for k, p in report.plots.items()
        }
        retry_until(
            lambda: tracking.log_evaluation(
                report, run_id=out.run_id, tracking=cfg.tracking, step=step
            ),
            "logging the evaluation",
            grace,
        )
        client = tracking.client_for(cfg.tracking)
        retry_until(
            lambda: client.set_tag(out.run_id, EVAL_HOST_TAG, host), "tagging the evaluation", grace
        )


def _register(cfg: ExperimentConfig, out: TrainResult, chosen: str) -> Any:
    """The evaluated checkpoint, verified, through the registry's promotion gate."""
    with storage.local_directory(chosen, files=(*MODEL_FILES, CHECKSUMS)) as checkpoint_dir:
        verify_checkpoint(checkpoint_dir, files=MODEL_FILES)
        return retry_until(
            lambda: tracking.log_model_and_register(
                checkpoint_dir, cfg.tracking, out.eval_metrics, out.run_id
            ),
            f"registering the model (best checkpoint: {chosen})",
            cfg.tracking.outage_grace_s,
        )
