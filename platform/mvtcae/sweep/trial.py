"""One Tune trial: an MLflow child run around the platform's Ray Train training.

The trial goes through the platform's run lifecycle (`mvtcae.training.lifecycle`): its child
run opened or reopened, config and dataset logged, fit, evaluated, and closed FINISHED, or
FAILED with its redacted error in ``mvtcae.tune.error``. What is the trial's own: which child
run to reopen, the retries, the NaN check, and the sweep's objectives in the plan of its
worker loop (`mvtcae.training.plan_loop`): after every epoch rank 0 measures them on the
validation split (a measure that α and β do not change) and reports them with the epoch's
metrics, and Tune hands them to ASHA and the searcher. A single-worker trial trains in its own process (``tune.trials_in_process``;
`mvtcae.training.hosts.InProcessHost`, which reports each epoch to Tune itself) and evaluates its
last checkpoint on the test split there; otherwise a ``TorchTrainer`` trains with a worker group
of its own, Tune's Ray Train callback forwards the reports, and the evaluation runs in a Ray task.

How a trial can end besides completing:

- *diverged*: the workers stop at the first non-finite step (`mvtcae.training.nonfinite`) and
  report that epoch's record with NaN objectives; the trial raises `TrialDiverged` there, so
  Tune records it as errored and the study as failed at that epoch;
- *infrastructure*: the tracking server, run storage or Ray failed under it. Such a failure is
  retried inside the trial (the inner Train run resumes from its checkpoint); when the retries
  are used up the trial reports ``mvtcae/failure_kind = infrastructure`` and raises
  `TrialInfrastructureError`: the searcher records the reason and runs the same parameters
  again instead of counting the trial against the budget.

MLflow logging goes through `mvtcae.tracking.run_logger.RunLogger`, so an outage delays metrics but
never fails a trial, and a failure handler never hides the original error.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.exceptions
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from mvtcae import storage
from mvtcae.config import EvaluationSection, ExperimentConfig, trial_config
from mvtcae.data import load_manifest
from mvtcae.safety.redaction import redact_text
from mvtcae.storage.checkpoints import checkpoint_epoch
from mvtcae.tracking.run_logger import SPOOL_DIR, RunLogger, mlflow_client, retry_until
from mvtcae.training import EpochObjectives, plan_loop
from mvtcae.training.lifecycle import (
    TrackedRun,
    closing,
    evaluate_run,
    fit,
    log_run_inputs,
    raise_if_stopped,
)
from mvtcae.training.nonfinite import NonFiniteError
from mvtcae.training.phases import PhaseTimes, timed
from mvtcae.training.run_console import logs_to_mlflow

logger = logging.getLogger(__name__)

TRIAL_TAG = "mvtcae.tune.trial_id"
SWEEP_TAG = "mvtcae.tune.sweep"
PARENT_TAG = "mlflow.parentRunId"
INTERRUPTED_TAG = "mvtcae.tune.interrupted"
TRIAL_ERROR_TAG = "mvtcae.tune.error"
"""The tag of a failed trial's run that records its (redacted) error."""
FAILURE_KIND_KEY = "mvtcae/failure_kind"
FAILURE_KEY = "mvtcae/failure"
INFRASTRUCTURE = "infrastructure"


class TrialDiverged(RuntimeError):
    """A trial's loss or objective became NaN or infinite."""


class TrialInfrastructureError(RuntimeError):
    """A trial failed because of the tracking server, run storage or Ray, not its parameters."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (passed with ``tune.with_parameters``)."""

    base_config: dict[str, Any]
    dataset_dir: str
    val_split: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    epoch_eval: EvaluationSection
    """The measures of the objectives, taken on ``val_split`` after every epoch."""
    objectives: tuple[str, ...]
    final_eval: bool
    tracking_grace_s: float = 120.0
    infra_retries: int = 2
    in_process: bool = False
    """Train in the trial's own process (`mvtcae.training.hosts.InProcessHost`), which holds the
    worker's resources, instead of in a worker group of its own."""


def _spool_location(context: SweepContext, trial_name: str) -> str:
    return storage.join(context.base_config["train"]["storage_path"], trial_name, SPOOL_DIR)


@dataclass(frozen=True)
class ChildRun:
    """A trial's MLflow run: its id, whether its config is logged, and whether an earlier
    attempt of the trial already finished it (evaluation included)."""

    run_id: str
    configured: bool
    finished: bool = False


def start_child_run(context: SweepContext, trial_id: str, params: dict[str, Any]) -> ChildRun:
    """The trial's MLflow run nested under the sweep's parent run: the run of this trial that an
    interruption cut, reopened (so a resumed trial keeps one run and one history), or the one an
    attempt finished before the sweep driver could record it; else a new run with the trial's
    sampled values.

    A cut run is KILLED when the sweep driver stopped it, and still RUNNING when the driver was
    killed outright (nothing was left to mark it): trial ids are unique to a sweep, so a
    RUNNING run of this trial belongs to an attempt that is gone.
    """
    client = mlflow_client(context.tracking_uri)
    runs = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{context.parent_run_id}' and "
        f"tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    done = [r for r in runs if r.info.status == "FINISHED"]
    if done:
        return ChildRun(done[0].info.run_id, configured=True, finished=True)
    cut = [r for r in runs if r.info.status in ("KILLED", "RUNNING")]
    if cut:
        run_id = cut[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        if INTERRUPTED_TAG in cut[0].data.tags:
            client.delete_tag(run_id, INTERRUPTED_TAG)
        return ChildRun(run_id, configured=bool(cut[0].data.params))  # cut before its config
    run = client.create_run(
        context.experiment_id,
        run_name=f"{context.sweep_name}-{trial_id}",
        tags={
            PARENT_TAG: context.parent_run_id,
            TRIAL_TAG: trial_id,
            SWEEP_TAG: context.sweep_name,
        },
    )
    client.log_dict(run.info.run_id, dict(params), "trial_params.json")
    return ChildRun(run.info.run_id, configured=False)


def check_finite(metrics: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    """Raise TrialDiverged when one of the named metrics is missing a finite value."""
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float) and not math.isfinite(value):
            raise TrialDiverged(f"{where}: {name} is {value}; the trial diverged")


def is_infrastructure_error(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a failure of the tracking server, run storage
    or Ray rather than of the trial's parameters or code."""
    infrastructure = (
        OSError,  # storage I/O, unreachable servers (ConnectionError, TimeoutError)
        ray.exceptions.RayActorError,
        ray.exceptions.ObjectLostError,
        ray.exceptions.NodeDiedError,
        ray.exceptions.RaySystemError,
    )
    seen: set[int] = set()
    stack = [error]
    while stack:
        err = stack.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, TrialDiverged | NonFiniteError):
            return False
        if isinstance(err, infrastructure):
            return True
        stack.extend([err.__cause__, err.__context__])
        failures = getattr(err, "worker_failures", None)  # Ray Train's WorkerGroupError
        if isinstance(failures, dict):
            stack.extend(failures.values())
    return False


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    """Tune function: train one configuration through the run lifecycle
    (`mvtcae.training.lifecycle`), in an MLflow child run of the sweep's parent run."""
    trial_id = ray.tune.get_context().get_trial_id()
    trial_name = f"{context.sweep_name}-{trial_id}"
    phases = PhaseTimes()
    started = time.perf_counter()
    try:
        with phases.phase("run_setup"):
            child = retry_until(
                lambda: start_child_run(context, trial_id, params),
                f"trial {trial_id}: creating its MLflow run",
                context.tracking_grace_s,
            )
    except Exception as err:
        _give_up_on_infrastructure(context, trial_id, err)
    tracker = RunLogger(
        context.tracking_uri, child.run_id, spool=_spool_location(context, trial_name)
    )
    run = TrackedRun(
        child.run_id,
        trial_name,
        context.tracking_uri,
        tracker=tracker,
        error_tag=TRIAL_ERROR_TAG,
        finished_before=child.finished,
    )
    try:
        # Tune stopping the trial (ASHA, or the sweep ending or interrupted) exits its report
        # call with SystemExit. Not a failure: the sweep ends the run from the trial's result
        # (`sweep_driver._close_child_runs`: early-stopped, interrupted or finished).
        with (
            closing(run, leave_open_on=(SystemExit,)),
            logs_to_mlflow(
                storage.join(context.base_config["train"]["storage_path"], trial_name),
                child.run_id,
                context.tracking_uri,
            ),
        ):
            _train_trial(params, context, trial_id, child, tracker, phases, started)
    except SystemExit:
        raise
    except BaseException as err:
        if is_infrastructure_error(err):
            _give_up_on_infrastructure(context, trial_id, err)
        raise


def _train_trial(
    params: dict[str, Any],
    context: SweepContext,
    trial_id: str,
    child: ChildRun,
    tracker: RunLogger,
    phases: PhaseTimes,
    started: float,
) -> None:
    """The trial's config and dataset logged (once), its fit, NaN check, final evaluation and
    phase times."""
    cfg = trial_config(context.base_config, params, source=f"trial {trial_id} {params}")
    if not child.configured:  # a reopened run has them already (MLflow params are write-once)
        with phases.phase("run_setup"):
            log_run_inputs(
                cfg, child.run_id, context.dataset_dir, load_manifest(context.dataset_dir)
            )
    result = _fit_with_retries(cfg, context, trial_id, child.run_id, phases)
    if child.finished:
        # Done before the sweep driver died: the fit restored its last checkpoint and
        # reported that result again for Tune; its run and evaluation stand as they are.
        return
    check_finite(result.metrics or {}, ("train/loss", "val/loss"), f"trial {trial_id}")
    if context.final_eval and result.checkpoint is not None:
        with phases.phase("evaluation"):
            _final_evaluation(cfg, context, result.checkpoint, tracker)
    timings = phases.as_metrics() | {"time/trial_total_s": time.perf_counter() - started}
    tracker.log_metrics(timings, int((result.metrics or {}).get("epoch", 0)))


def _fit_with_retries(
    cfg: ExperimentConfig,
    context: SweepContext,
    trial_id: str,
    run_id: str,
    phases: PhaseTimes | None = None,
) -> Any:
    """Fit, retrying infrastructure failures; a retry resumes the inner run's last checkpoint.
    A run whose workers stopped on non-finite values raises TrialDiverged."""
    name = f"{context.sweep_name}-{trial_id}"
    run_dir = storage.join(cfg.train.storage_path, name)
    for attempt in range(context.infra_retries + 1):
        try:
            result = _fit(cfg, context, name, run_id, phases)
            try:
                raise_if_stopped(run_dir)
            except NonFiniteError as failure:
                raise TrialDiverged(f"trial {trial_id}: {failure}") from failure
            return result
        except Exception as err:
            if attempt == context.infra_retries or not is_infrastructure_error(err):
                raise
            wait = 5.0 * 2**attempt
            logger.warning(
                "trial %s: infrastructure failure (%s: %s); retry %d of %d in %.0f s",
                trial_id,
                type(err).__name__,
                redact_text(str(err))[:300],
                attempt + 1,
                context.infra_retries,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")


def _give_up_on_infrastructure(context: SweepContext, trial_id: str, err: BaseException) -> None:
    """Tell Tune (and so the searcher) that the trial failed for an infrastructure reason."""
    reason = redact_text(f"{type(err).__name__}: {err}")[:1000]
    ray.tune.report(
        {
            FAILURE_KIND_KEY: INFRASTRUCTURE,
            FAILURE_KEY: reason,
            **dict.fromkeys(context.objectives, math.nan),
        }
    )
    raise TrialInfrastructureError(f"trial {trial_id}: {reason}") from err


def _fit(
    cfg: ExperimentConfig,
    context: SweepContext,
    name: str,
    run_id: str,
    phases: PhaseTimes | None = None,
) -> Any:
    """Plan the trial's fit with the sweep's objectives and fit it: in the trial's process, which
    reports each epoch to Tune, or with a worker group whose reports Tune's callback forwards."""
    objectives = EpochObjectives(
        names=context.objectives, measures=context.epoch_eval, split=context.val_split
    )
    plan = plan_loop(
        cfg,
        name,
        context.dataset_dir,
        load_manifest(context.dataset_dir),
        run_id,
        context.tracking_uri,
        objectives,
        phases,
    )
    with timed(phases, "trainer_fit"):
        if context.in_process:
            return fit(cfg, name, plan, in_process=True, report_to_tune=True)
        return fit(cfg, name, plan, callbacks=[TuneReportCallback()])


def _final_evaluation(
    cfg: ExperimentConfig, context: SweepContext, checkpoint: Any, tracker: RunLogger
) -> None:
    """Evaluate the trial's last checkpoint on the test split, with the CPUs (and the GPU) that
    training had: in the trial's process when it trained there and holds them, else in a Ray
    task of its own. Log the measures to the trial's run."""
    location = storage.location_of(cfg.train.storage_path, checkpoint.path)
    eval_cfg = cfg.eval.model_copy(update={"plots": False})
    done = evaluate_run(
        [location], context.dataset_dir, eval_cfg, cfg.train, in_process=context.in_process
    )
    tracker.log_metrics(done.report.metrics, checkpoint_epoch(location) or 0)
