"""The worker loop: restore, train with DDP, validate, checkpoint and report each epoch.

It runs as a Ray Train worker (`train_loop_per_worker`) or, for a single-worker sweep trial, in
the caller's process (`train_in_process`); `mvtcae.training.hosts` is the difference.

Rank 0 logs to MLflow (through a `RunLogger`, so a tracking outage never stops training),
writes each epoch's checkpoint (model, optimizer, scheduler, every rank's RNG states, checksums)
and, when the run is a sweep trial, measures the objectives on the validation split, so that the
metrics reported to Ray Train (and through Tune's reporting callback, to the sweep) carry them.
Errors that a restart cannot fix (non-finite values, no intact checkpoint) end the workers with a
stop record in run storage instead of an exception Ray would answer with a restart.

Beside it: the worker group's collectives (`collectives`), each split's batches per epoch
(`epoch_input`), what rank 0 adds to an epoch (`rank_zero`: MLflow, system metrics, objectives,
image grids) and the stop record (`stop_record`). What stays here is the loop itself: restore,
the epoch, the report and the checkpoint, which share the worker's state.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from mvtcae import MVTCAE
from mvtcae.config import TrainSection
from mvtcae.data import load_manifest
from mvtcae.storage import console
from mvtcae.storage.checkpoints import (
    CorruptCheckpointError,
    TrainerState,
    checkpoint_dir_name,
    load_model,
    open_intact_checkpoint,
    read_rng_states,
    restore_optimizer,
    restore_rng_state,
    save_checkpoint,
)
from mvtcae.tracking.run_logger import RunLogger
from mvtcae.training.checkpoint_schedule import (
    CheckpointSchedule,
    Due,
    describe_notice,
    wait_for_deadline,
)
from mvtcae.training.collectives import all_reduce, gather_rng_states, min_over_workers
from mvtcae.training.epoch_input import EpochInput
from mvtcae.training.hosts import (
    InProcessHost,
    LoopHost,
    RayTrainHost,
    persist_checkpoint,
    prune_inside_epochs,
)
from mvtcae.training.nonfinite import NonFiniteError, StepGuard, nonfinite_values
from mvtcae.training.plan import PLAN_KEY, LoopPlan
from mvtcae.training.rank_zero import (
    PREEMPTION_TAG_PREFIX,
    WORLD_SIZE_KEY,
    announce_restore,
    announce_world,
    epoch_objectives,
    log_epoch_images,
    rank0_logger,
    system_metrics,
)
from mvtcae.training.step import (
    bf16_supported,
    build_optimizer,
    build_scheduler,
    epoch_metrics,
    run_train_epoch,
    run_validation,
)
from mvtcae.training.stop_record import (
    CORRUPT_REPORT_KEY,
    stop_workers,
)

logger = logging.getLogger(__name__)

RUN_ID_KEY = "mlflow_run_id"


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@dataclass
class _Restored:
    model: MVTCAE
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: TrainerState
    path: str
    skipped: list[str]


def _restore(
    checkpoint: Any, cfg: TrainSection, device: torch.device, rank: int, world: int, seed: int
) -> _Restored:
    """Model, optimizer, scheduler and RNG states from the newest intact checkpoint of the run."""
    with open_intact_checkpoint(checkpoint.filesystem, checkpoint.path) as found:
        model = load_model(found.directory).to(device)
        optimizer = build_optimizer(model.named_parameters(), cfg)
        scheduler = build_scheduler(optimizer, cfg)
        state = restore_optimizer(found.directory, optimizer, scheduler, map_location=device)
        rng = read_rng_states(found.directory)
    if rng is not None and len(rng) == world:
        restore_rng_state(rng[rank])
    else:  # a checkpoint from another world size: a fresh, still deterministic stream
        _seed_everything(seed + 7919 * state.epoch)
    return _Restored(model, optimizer, scheduler, state, found.path, found.skipped)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker: restore, train with DDP, validate, report and checkpoint every epoch.

    ``config`` holds the run's `LoopPlan` under `PLAN_KEY`. Non-finite values stop every rank
    at the same step; the workers then report the reason (`NonFiniteError.to_report`) and
    return, so that Ray does not restart them for it.
    """
    plan = config[PLAN_KEY]
    run_loop(plan, RayTrainHost(plan.run_dir))


@dataclass
class InProcessResult:
    """What an in-process fit ends with: the last report's metrics and checkpoint (as the
    ``metrics`` and ``checkpoint`` of Ray Train's ``Result``)."""

    metrics: dict[str, Any]
    checkpoint: ray.train.Checkpoint | None


def train_in_process(
    plan: LoopPlan, datasets: dict[str, Any] | None = None, *, report_to_tune: bool = False
) -> InProcessResult:
    """The worker loop as the only worker, in this process (`InProcessHost`): checkpoints go
    to the plan's ``run_dir``, the run resumes from its newest one, and with
    ``report_to_tune`` every epoch is reported to the Tune trial this runs in."""
    train = plan.train
    if train.max_workers != 1:
        raise ValueError(f"training in process needs train.num_workers 1, not {train.num_workers}")
    host = InProcessHost(
        run_dir=plan.run_dir,
        keep=train.checkpoint.num_to_keep,
        datasets=datasets,
        to_tune=report_to_tune,
    )
    threads = torch.get_num_threads()
    try:
        run_loop(plan, host)
    finally:
        torch.set_num_threads(threads)  # the caller's process goes on with its own setting
    host.report_restored_again({RUN_ID_KEY: plan.run_id} if plan.run_id else None)
    return InProcessResult(metrics=host.last_metrics, checkpoint=host.last_checkpoint)


def run_loop(plan: LoopPlan, host: LoopHost) -> None:
    """Restore, train, validate, report and checkpoint every epoch, as one worker of ``host``."""
    run_log = _worker_logging(
        plan.run_dir, host.rank, uses_mlflow=plan.tracked and host.local_rank == 0
    )
    cfg, rank = plan.train, host.rank
    torch.set_num_threads(plan.threads_per_worker)
    _seed_everything(cfg.seed + rank)
    device = host.device()
    if cfg.precision == "bf16" and rank == 0 and not bf16_supported(device):
        logger.warning("%s has no native bf16; bf16 autocast will be slow", device)
    manifest = load_manifest(plan.dataset_dir)
    tracker = rank0_logger(plan) if rank == 0 else None
    with run_log, system_metrics(plan, rank, sampler=host.local_rank == 0):
        _train(plan, host, device, manifest, tracker)


@dataclass
class _WorkerRun:
    """One worker's training: its plan and host, the model and its optimizer (restored or
    fresh), its inputs, and where its epochs start."""

    plan: LoopPlan
    host: LoopHost
    device: torch.device
    tracker: RunLogger | None
    model: MVTCAE
    optimizer: torch.optim.Optimizer
    scheduler: Any
    first_epoch: int = 1
    skipped_steps: int = 0
    dir_suffix: str = ""
    """Added to checkpoint names when epochs whose (corrupt) checkpoints exist are trained again."""
    logged: frozenset[int] = frozenset()
    """Epochs the run logged after the restored checkpoint, before its process died: trained
    again from it (the same numbers), but not logged twice."""
    inside: TrainerState | None = None
    """The restored checkpoint when it was written inside ``first_epoch``: that epoch goes on
    after its steps, from its position, with its sums."""
    schedule: CheckpointSchedule | None = None


def _train(
    plan: LoopPlan, host: LoopHost, device: torch.device, manifest: Any, tracker: RunLogger | None
) -> None:
    """The worker's epochs, from a restored checkpoint or from scratch."""
    try:
        run = _start(plan, host, device, tracker)
        if run is None:
            return
        ddp_model = host.wrap_model(run.model)
        cfg = plan.train
        guard = StepGuard(
            cfg.on_nonfinite, cfg.max_nonfinite_steps, min_over_workers, run.skipped_steps
        )
        train_input, val_input = _inputs(plan, manifest, device, host)
        run.schedule = _schedule(plan, host, device)
        if tracker is not None:
            tracker.set_tags(
                {
                    "mvtcae.data.input": "held" if plan.held_splits else "ray data",
                    "mvtcae.train.host": host.kind,
                }
            )
        for epoch in range(run.first_epoch, cfg.epochs + 1):
            metrics = _train_epoch(run, epoch, ddp_model, guard, train_input, val_input)
            _check_finite(metrics, epoch, device)
            _report_epoch(run, epoch, metrics)
    except NonFiniteError as err:
        _stop_nonfinite(plan, host, tracker, err)
    finally:
        if tracker is not None:
            tracker.close(plan.tracking_grace_s)


def _start(
    plan: LoopPlan, host: LoopHost, device: torch.device, tracker: RunLogger | None
) -> _WorkerRun | None:
    """The run restored from its newest intact checkpoint, or a fresh model; None (the workers
    stopped) when it has checkpoints but none is intact."""
    cfg = plan.train
    checkpoint = host.restore_point()
    if checkpoint is None:
        # The worker's own copy: a model records its custom networks in its config.
        model = MVTCAE(copy.deepcopy(plan.model)).to(device)
        optimizer = build_optimizer(model.named_parameters(), cfg)
        if tracker is not None:
            announce_world(tracker, cfg, host.world)
        return _WorkerRun(
            plan, host, device, tracker, model, optimizer, build_scheduler(optimizer, cfg)
        )
    try:
        restored = _restore(checkpoint, cfg, device, host.rank, host.world, cfg.seed + host.rank)
    except CorruptCheckpointError as err:  # a restart would meet the same files: stop
        stop_workers(plan.run_dir, host, {CORRUPT_REPORT_KEY: str(err)})
        return None
    first = restored.state.epoch + 1
    run = _WorkerRun(
        plan,
        host,
        device,
        tracker,
        restored.model,
        restored.optimizer,
        restored.scheduler,
        first_epoch=first,
        skipped_steps=int(restored.state.metrics.get("train/skipped_steps_total", 0)),
        dir_suffix=uuid.uuid4().hex[:6] if restored.skipped else "",
        inside=restored.state if restored.state.step else None,
    )
    if tracker is not None:
        announce_restore(tracker, restored.state, restored.path, restored.skipped)
        announce_world(tracker, cfg, host.world, restored.state.epoch, restored.state.world_size)
        run.logged = frozenset(s for s in tracker.logged_steps("val/loss") if s >= first)
    return run


def _inputs(
    plan: LoopPlan, manifest: Any, device: torch.device, host: LoopHost
) -> tuple[EpochInput, EpochInput]:
    """The worker's training and validation input (its share of the global batch)."""
    held = plan.held_splits or {}
    local_batch = max(1, plan.train.batch_size // host.world)
    train_input = EpochInput(
        "train",
        held.get("train"),
        manifest,
        local_batch,
        device,
        host,
        shuffle_buffer=plan.shuffle_buffer,
        seed=plan.train.seed,
    )
    val_input = EpochInput("val", held.get("val"), manifest, local_batch, device, host)
    return train_input, val_input


def _train_epoch(
    run: _WorkerRun,
    epoch: int,
    ddp_model: torch.nn.Module,
    guard: StepGuard,
    train_input: EpochInput,
    val_input: EpochInput,
) -> dict[str, float]:
    """Train and validate one epoch; its metrics over the worker group (and rank 0's
    objectives in a sweep trial)."""
    cfg, device = run.plan.train, run.device
    epoch_start = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    inside = run.inside if run.inside is not None and run.first_epoch == epoch else None
    run.inside = None
    first_step = inside.step if inside is not None else 0
    limit = cfg.max_batches_per_epoch
    train_batches = train_input.batches(
        epoch,
        limit=None if limit is None else max(0, limit - first_step),
        start=inside.rows if inside is not None else 0,
    )
    schedule = run.schedule

    def after_step(step: int, totals: Callable[[], dict[str, float]]) -> None:
        due = schedule.due(step) if schedule is not None and schedule.active else None
        if due is not None:
            _checkpoint_inside(run, epoch, step, totals(), guard, due)
        if due is not None and due.notice is not None:
            waited = wait_for_deadline(due.notice)
            if run.host.rank == 0:
                logger.warning("Ray did not stop the group %.0f s after the notice", waited)

    train_sums = run_train_epoch(
        ddp_model,
        train_batches,
        run.optimizer,
        device,
        cfg,
        epoch=epoch,
        guard=guard,
        first_step=first_step,
        # The group's sums from before the checkpoint, added once (by rank 0).
        carried=inside.partial if inside is not None and run.host.rank == 0 else None,
        after_step=after_step,
    )
    run.scheduler.step()
    val_sums = run_validation(run.model, val_input.batches(epoch))
    metrics = _group_metrics(epoch, train_sums, val_sums, epoch_start, lr, device)
    metrics["train/skipped_steps_total"] = float(guard.skipped)
    metrics[WORLD_SIZE_KEY] = float(run.host.world)  # elastic runs change it at a restart
    if run.plan.objectives is not None:
        objectives_start = time.perf_counter()
        metrics.update(epoch_objectives(run.model, run.plan, run.host.rank, device))
        metrics["perf/objectives_time_s"] = time.perf_counter() - objectives_start
    return metrics


def _check_finite(metrics: dict[str, float], epoch: int, device: torch.device) -> None:
    """Raise NonFiniteError on every rank when any rank's metrics hold a non-finite value."""
    bad = nonfinite_values(metrics)
    # Losses are all-reduced, the objectives rank 0's: agree before stopping together.
    if all_reduce({"bad": float(bool(bad))}, device, op="max")["bad"] > 0:
        raise NonFiniteError(epoch, None, bad or {"(rank 0's objectives)": float("nan")})


def _schedule(plan: LoopPlan, host: LoopHost, device: torch.device) -> CheckpointSchedule | None:
    """The run's checkpoints inside epochs; None in a sweep trial, whose every report is a
    result of the sweep (its epochs are checkpointed as before)."""
    if plan.objectives is not None:
        return None
    return CheckpointSchedule(
        plan.train.checkpoint, device, notices=host if plan.watch_preemption else None
    )


def _checkpoint_inside(
    run: _WorkerRun,
    epoch: int,
    step: int,
    totals: dict[str, float],
    guard: StepGuard,
    due: Due,
) -> None:
    """Every rank: a checkpoint of the group after ``step`` steps of ``epoch``, holding the
    group's sums of those steps and its position in the epoch's order; rank 0 writes it.

    It is not reported to Ray Train: a report is an epoch's result (ranked by its metric, and in
    a sweep a result of the trial). Rank 0 writes it into the run's directory itself, beside the
    epochs' checkpoints, and keeps only the newest; a restore takes the newest of all
    (`restore_candidates`), and a run with none of Ray's yet finds it there (`RayTrainHost`)."""
    host, cfg, device = run.host, run.plan.train, run.device
    totals.pop("first_batch_s", None)
    slowest = all_reduce({"time_s": totals.pop("time_s")}, device, op="max")
    group = all_reduce(totals, device) | slowest
    rng_states = gather_rng_states(host.world)
    if run.schedule is not None:
        run.schedule.written()
    if host.rank != 0:
        return
    state = TrainerState(
        epoch=epoch - 1,
        metrics={"train/skipped_steps_total": float(guard.skipped)},
        precision=cfg.precision,
        world_size=host.world,
        step=step,
        rows=int(group["seen_rows"]),
        partial=group,
    )
    name = checkpoint_dir_name(epoch, run.dir_suffix, step=step)
    with tempfile.TemporaryDirectory(prefix="mvtcae-ckpt-") as tmp:
        save_checkpoint(tmp, run.model, run.optimizer, run.scheduler, state, rng_states)
        persist_checkpoint(tmp, run.plan.run_dir, name, keep=None)
    prune_inside_epochs(run.plan.run_dir, name)
    if due.notice is not None:
        note = describe_notice(due.notice)
        logger.warning(
            "%s: checkpointed epoch %d at step %d; waiting for the deadline, then the run "
            "restarts from it on the remaining nodes",
            note,
            epoch,
            step,
        )
        if run.tracker is not None:
            run.tracker.set_tags({f"{PREEMPTION_TAG_PREFIX}{epoch:04d}_step_{step:06d}": note})
    else:
        logger.debug("epoch %d: checkpoint at step %d (%s)", epoch, step, due.reason)


def _report_epoch(run: _WorkerRun, epoch: int, metrics: dict[str, float]) -> None:
    """Report and checkpoint the epoch; rank 0 logs it (unless logged before a restore) with
    its image grids and what the report and the images cost."""
    report_start = time.perf_counter()
    tracker = None if epoch in run.logged else run.tracker
    _report(run, metrics, epoch, tracker)
    if tracker is not None:
        images_start = time.perf_counter()
        log_epoch_images(run.model, run.plan, tracker, epoch, run.device)
        # After the report, so logged beside it: what checkpointing and images cost.
        tracker.log_metrics(
            {
                "perf/report_s": images_start - report_start,
                "perf/images_s": time.perf_counter() - images_start,
            },
            epoch,
        )


def _stop_nonfinite(
    plan: LoopPlan, host: LoopHost, tracker: RunLogger | None, err: NonFiniteError
) -> None:
    """Stop every rank on a non-finite value; rank 0 tags the run with it."""
    if tracker is not None:
        logger.error("%s", err)
        tracker.set_tags({"mvtcae.nonfinite": str(err)})
    # The objectives are undefined for this epoch; a sweep records the trial as failed here.
    names = plan.objectives.names if plan.objectives is not None else ()
    stop_workers(plan.run_dir, host, err.to_report() | dict.fromkeys(names, float("nan")))


def _group_metrics(
    epoch: int,
    train_sums: dict[str, float],
    val_sums: dict[str, float],
    epoch_start: float,
    lr: float,
    device: torch.device,
) -> dict[str, float]:
    """The epoch's metrics from every rank's sums (sums added, times the slowest rank's)."""
    slowest = {"time_s": train_sums.pop("time_s"), "first_batch_s": train_sums.pop("first_batch_s")}
    slowest = all_reduce(slowest, device, op="max")
    train_sums = all_reduce(train_sums, device) | {"first_batch_s": slowest["first_batch_s"]}
    val_sums = all_reduce(val_sums, device)
    epoch_time = all_reduce({"t": time.perf_counter() - epoch_start}, device, op="max")["t"]
    return epoch_metrics(epoch, train_sums, val_sums, slowest["time_s"], epoch_time, lr)


class _WorkerHandler(logging.StreamHandler):
    """This package's log lines in a Train worker, on stdout (which Ray forwards to the driver
    once; Train V2's patched ``print`` would show each line twice)."""

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname}: " if record.levelno >= logging.WARNING else ""
        return f"[mvtcae] {level}{record.getMessage()}"


_open_log: list[console.RunLog] = []
"""The run log this worker process writes now (a reused Tune actor trains one run after another)."""


def _worker_logging(
    run_dir: str | None, rank: int, *, uses_mlflow: bool = False
) -> contextlib.AbstractContextManager[Any]:
    """The worker's console and run log: the ``mvtcae`` loggers' INFO and above go to the
    driver's output (once per process); Ray's, MLflow's and Optuna's INFO lines only to
    ``<run_dir>/logs/rank<k>.log`` unless verbose (`mvtcae.storage.console`), where this
    package's lines go too. Returns what closes the log (a no-op without a run directory).

    ``uses_mlflow``: this worker logs to MLflow (rank 0, a node's system-metrics sampler);
    MLflow replaces its loggers' handlers on import, so it is imported before they are set."""
    if uses_mlflow:
        import mlflow  # noqa: F401 - configures its loggers now, not after the filter below
    package = logging.getLogger("mvtcae")
    if not any(isinstance(h, _WorkerHandler) for h in package.handlers):
        package.addHandler(_WorkerHandler(sys.stdout))
        package.setLevel(logging.INFO)
        package.propagate = False
    console.quiet_console()  # after Ray Train's logging set-up and MLflow's import
    while _open_log:  # an earlier run of this process that ended without closing its log
        _open_log.pop().close()
    if not run_dir:
        return contextlib.nullcontext()
    try:
        log = console.RunLog(run_dir, f"rank{rank}").attach()
    except OSError as err:  # the console still has every line that matters
        logger.warning("no log file in %s: %s: %s", run_dir, type(err).__name__, err)
        return contextlib.nullcontext()
    _open_log.append(log)

    @contextlib.contextmanager
    def closing_log() -> Iterator[None]:
        try:
            yield
        finally:
            if log in _open_log:
                _open_log.remove(log)
            log.close()

    return closing_log()


def _report(
    run: _WorkerRun, metrics: dict[str, float], epoch: int, tracker: RunLogger | None
) -> None:
    """Every rank reports; rank 0 alone logs to MLflow and passes a checkpoint (and names its
    MLflow run, so that a sweep can link the trial to it)."""
    host, cfg, run_id = run.host, run.plan.train, run.plan.run_id
    rank, world = host.rank, host.world
    rng_states = gather_rng_states(world)
    if run.schedule is not None:
        run.schedule.written()
    if rank != 0:
        host.report(metrics)
        return
    line = "  ".join(
        f"{k}={v:.4g}"
        for k, v in metrics.items()
        if k.startswith(("train/loss", "val/loss", "perf/s"))
    )
    logger.info("epoch %d/%d  %s", epoch, cfg.epochs, line)
    if tracker is not None:
        tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
    reported = metrics | ({RUN_ID_KEY: run_id} if run_id else {})
    with tempfile.TemporaryDirectory(prefix="mvtcae-ckpt-") as tmp:
        state = TrainerState(
            epoch=epoch, metrics=metrics, precision=cfg.precision, world_size=world
        )
        save_checkpoint(tmp, run.model, run.optimizer, run.scheduler, state, rng_states)
        dir_name = checkpoint_dir_name(epoch, run.dir_suffix)
        host.report(reported, checkpoint_dir=tmp, dir_name=dir_name)
    if run.schedule is not None and run.schedule.active:
        prune_inside_epochs(run.plan.run_dir, dir_name)
