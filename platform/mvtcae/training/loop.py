"""The worker loop: restore, train with DDP, validate, checkpoint and report each epoch.

It runs as a Ray Train worker (`train_loop_per_worker`) or, for a single-worker sweep trial, in
the caller's process (`train_in_process`); `mvtcae.training.hosts` is the difference.

Rank 0 logs to MLflow (through a `RunLogger`, so a tracking outage never stops training),
writes each epoch's checkpoint (model, optimizer, scheduler, every rank's RNG states, checksums)
and, when the run is a sweep trial, measures the objectives on the validation split, so that the
metrics reported to Ray Train (and through Tune's reporting callback, to the sweep) carry them.
Errors that a restart cannot fix (non-finite values, no intact checkpoint) end the workers with a
stop record in run storage instead of an exception Ray would answer with a restart.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mvtcae import MVTCAE, MultimodalBatch, storage
from mvtcae.config import TrainSection
from mvtcae.data import iter_model_batches, load_manifest
from mvtcae.data.held import HeldSplit
from mvtcae.evaluation import evaluate
from mvtcae.evaluation.plots import image_grids, image_modalities
from mvtcae.evaluation.split import load_eval_split
from mvtcae.storage import console
from mvtcae.storage.checkpoints import (
    CorruptCheckpointError,
    TrainerState,
    capture_rng_state,
    checkpoint_dir_name,
    load_model,
    open_intact_checkpoint,
    read_rng_states,
    restore_optimizer,
    restore_rng_state,
    save_checkpoint,
)
from mvtcae.tracking.run_logger import SPOOL_DIR, RunLogger, client_uri
from mvtcae.training.hosts import InProcessHost, LoopHost, RayTrainHost
from mvtcae.training.nonfinite import NonFiniteError, StepGuard, nonfinite_values
from mvtcae.training.plan import PLAN_KEY, LoopPlan
from mvtcae.training.step import (
    bf16_supported,
    build_optimizer,
    build_scheduler,
    epoch_metrics,
    run_train_epoch,
    run_validation,
)

logger = logging.getLogger(__name__)

STOP_FILE = "mvtcae_stop.json"
"""Written by rank 0 into the run directory when the workers stop on an error that a restart
cannot fix (non-finite values, no intact checkpoint); the driver raises it after ``fit``.
Ray Train keeps only the metrics reported with checkpoints, so a report cannot carry it."""
CORRUPT_REPORT_KEY = "checkpoint/corrupt"
RUN_ID_KEY = "mlflow_run_id"
RESUMED_AFTER_KEY = "train/resumed_after_epoch"
"""Logged at the epoch a run restored from (once per epoch, however often it restored there)."""


def _all_reduce(
    values: dict[str, float], device: torch.device, op: str = "sum"
) -> dict[str, float]:
    """Sum (or max) a dict of floats over the worker group; keys are identical on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist(), strict=True))


class _EpochInput:
    """A worker's batches of one split each epoch: its share of the split held in memory
    (`HeldSplit`, when the driver put the split in the object store), else its Ray Data shard.
    A held split is fetched inside the first epoch's iteration, so that its cost shows in that
    epoch's first-batch wait."""

    def __init__(
        self,
        split: str,
        held_ref: Any,
        manifest: Any,
        batch_size: int,
        device: torch.device,
        host: LoopHost,
        *,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ) -> None:
        self.split, self.manifest, self.batch_size = split, manifest, batch_size
        self.device, self.host, self.rank, self.world = device, host, host.rank, host.world
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.held_ref = held_ref
        self._held: HeldSplit | None = None

    def batches(self, epoch: int, limit: int | None = None) -> Iterator[MultimodalBatch]:
        """This epoch's batches (at most ``limit``)."""
        shuffle = self.shuffle_buffer > 0
        if self.held_ref is not None:
            if self._held is None:
                self._held = HeldSplit.fetch(self.held_ref, self.manifest, self.device)
            # Training shares must be equal (DDP steps in lockstep); validation uses every row.
            rows = self._held.rank_rows(
                self.rank,
                self.world,
                shuffle=shuffle,
                seed=self.seed,
                epoch=epoch,
                equal=self.split == "train",
            )
            batches = self._held.batches(rows, self.batch_size)
        else:
            batches = iter_model_batches(
                self.host.shard(self.split),
                self.manifest,
                self.batch_size,
                device=self.device,
                shuffle=shuffle,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                seed=data_order_seed(self.seed, self.rank),
                epoch=epoch,
            )
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            yield batch


def data_order_seed(seed: int, rank: int) -> int:
    """The base seed of a rank's row order; epoch ``e`` shuffles with ``data_order_seed + e``,
    so the order of any epoch depends only on (seed, rank, epoch), also after a resume."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _min_over_workers(flag: torch.Tensor) -> torch.Tensor:
    """MIN all-reduce of a one-element tensor (the step guard's "all finite" flag)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = flag.device if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = flag.detach().reshape(1).to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
    return reduced[0]


def _gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (a collective: all ranks call it)."""
    mine = capture_rng_state()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)  # in memory between this run's own workers
    return states


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
    run_loop(config[PLAN_KEY], RayTrainHost())


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
    if train.num_workers != 1:
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
    tracker = _rank0_logger(plan) if rank == 0 else None
    with run_log, _system_metrics(plan, rank, sampler=host.local_rank == 0):
        _train(plan, host, device, manifest, tracker)


@contextmanager
def _system_metrics(plan: LoopPlan, rank: int, sampler: bool) -> Iterator[None]:
    """MLflow's system metrics of this worker's machine, into the run as ``system/rank<k>/...``
    when this worker is its node's ``sampler`` (its first worker): one series per node, named
    by that worker's rank, so that nodes do not overwrite each other and no machine is sampled
    twice (each monitor also costs its worker an MLflow client: over a second at start with a
    SQLite store)."""
    interval = plan.system_metrics_interval_s
    if not sampler or interval <= 0 or not plan.tracked:
        yield
        return
    try:  # imported here: it needs psutil, and training goes on without it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            plan.run_id,
            sampling_interval=interval,
            node_id=f"rank{rank}",
            tracking_uri=client_uri(plan.tracking_uri),
            resume_logging=True,
        )
        # Started before training, not beside it: a monitor started in the background missed
        # every sample of a run shorter than its start-up (a 2-epoch test run lost them all).
        monitor.start()
    except Exception as err:  # noqa: BLE001 - e.g. psutil missing: train without them
        logger.warning("system metrics are off: %s: %s", type(err).__name__, err)
        yield
        return
    try:
        yield
    finally:
        monitor.finish()


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
            cfg.on_nonfinite, cfg.max_nonfinite_steps, _min_over_workers, run.skipped_steps
        )
        train_input, val_input = _inputs(plan, manifest, device, host)
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
        return _WorkerRun(
            plan, host, device, tracker, model, optimizer, build_scheduler(optimizer, cfg)
        )
    try:
        restored = _restore(checkpoint, cfg, device, host.rank, host.world, cfg.seed + host.rank)
    except CorruptCheckpointError as err:  # a restart would meet the same files: stop
        _stop(plan.run_dir, host, {CORRUPT_REPORT_KEY: str(err)})
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
    )
    if tracker is not None:
        _announce_restore(tracker, restored)
        run.logged = frozenset(s for s in tracker.logged_steps("val/loss") if s >= first)
    return run


def _inputs(
    plan: LoopPlan, manifest: Any, device: torch.device, host: LoopHost
) -> tuple[_EpochInput, _EpochInput]:
    """The worker's training and validation input (its share of the global batch)."""
    held = plan.held_splits or {}
    local_batch = max(1, plan.train.batch_size // host.world)
    train_input = _EpochInput(
        "train",
        held.get("train"),
        manifest,
        local_batch,
        device,
        host,
        shuffle_buffer=plan.shuffle_buffer,
        seed=plan.train.seed,
    )
    val_input = _EpochInput("val", held.get("val"), manifest, local_batch, device, host)
    return train_input, val_input


def _train_epoch(
    run: _WorkerRun,
    epoch: int,
    ddp_model: torch.nn.Module,
    guard: StepGuard,
    train_input: _EpochInput,
    val_input: _EpochInput,
) -> dict[str, float]:
    """Train and validate one epoch; its metrics over the worker group (and rank 0's
    objectives in a sweep trial)."""
    cfg, device = run.plan.train, run.device
    epoch_start = time.perf_counter()
    lr = run.optimizer.param_groups[0]["lr"]
    train_batches = train_input.batches(epoch, limit=cfg.max_batches_per_epoch)
    train_sums = run_train_epoch(
        ddp_model, train_batches, run.optimizer, device, cfg, epoch=epoch, guard=guard
    )
    run.scheduler.step()
    val_sums = run_validation(run.model, val_input.batches(epoch))
    metrics = _group_metrics(epoch, train_sums, val_sums, epoch_start, lr, device)
    metrics["train/skipped_steps_total"] = float(guard.skipped)
    if run.plan.objectives is not None:
        objectives_start = time.perf_counter()
        metrics.update(_epoch_objectives(run.model, run.plan, run.host.rank, device))
        metrics["perf/objectives_time_s"] = time.perf_counter() - objectives_start
    return metrics


def _check_finite(metrics: dict[str, float], epoch: int, device: torch.device) -> None:
    """Raise NonFiniteError on every rank when any rank's metrics hold a non-finite value."""
    bad = nonfinite_values(metrics)
    # Losses are all-reduced, the objectives rank 0's: agree before stopping together.
    if _all_reduce({"bad": float(bool(bad))}, device, op="max")["bad"] > 0:
        raise NonFiniteError(epoch, None, bad or {"(rank 0's objectives)": float("nan")})


def _report_epoch(run: _WorkerRun, epoch: int, metrics: dict[str, float]) -> None:
    """Report and checkpoint the epoch; rank 0 logs it (unless logged before a restore) with
    its image grids and what the report and the images cost."""
    report_start = time.perf_counter()
    tracker = None if epoch in run.logged else run.tracker
    _report(run, metrics, epoch, tracker)
    if tracker is not None:
        images_start = time.perf_counter()
        _log_epoch_images(run.model, run.plan, tracker, epoch, run.device)
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
    _stop(plan.run_dir, host, err.to_report() | dict.fromkeys(names, float("nan")))


def to_val_names(metrics: dict[str, float]) -> dict[str, float]:
    """An evaluation's ``eval/x`` metrics as ``val/x`` (they were measured on validation)."""
    return {"val/" + k.removeprefix("eval/"): float(v) for k, v in metrics.items()}


def _epoch_objectives(
    model: MVTCAE, plan: LoopPlan, rank: int, device: torch.device
) -> dict[str, float]:
    """Rank 0, in a sweep trial: the objectives' measures of this epoch's model on the validation
    split (the evaluation forks the generators, so training's random stream is untouched)."""
    objectives = plan.objectives
    if rank != 0 or objectives is None:
        return {}
    try:
        report = evaluate(
            model, plan.dataset_dir, objectives.measures, split=objectives.split, device=device
        )
        return to_val_names(report.metrics)
    except Exception as err:  # noqa: BLE001 - a diverged model can break the probe or the NLL
        logger.warning("validation measures failed: %s: %s", type(err).__name__, err)
        return dict.fromkeys(objectives.names, float("nan"))
    finally:
        model.train()


@functools.lru_cache(maxsize=1)
def _grid_split(dataset_dir: str, split: str, max_rows: int) -> Any:
    """The validation samples of the epoch grids, read once per worker (the same every epoch)."""
    return load_eval_split(dataset_dir, split, max_rows=max_rows)


def _log_epoch_images(
    model: MVTCAE, plan: LoopPlan, tracker: RunLogger, epoch: int, device: torch.device
) -> None:
    """Rank 0, every ``images.every`` epochs: reconstruction and cross-modal grids of the same
    validation samples, as MLflow images at this epoch (image modalities only)."""
    grids_plan = plan.images
    every = grids_plan.every
    if every <= 0 or epoch % every or not image_modalities(model):
        return
    try:
        split = _grid_split(plan.dataset_dir, grids_plan.split, 16 * grids_plan.samples)
        with tempfile.TemporaryDirectory(prefix="mvtcae-grids-") as scratch:
            grids = image_grids(model, split, grids_plan.samples, Path(scratch), device)
            tracker.log_images(grids, epoch)
    except Exception as err:  # noqa: BLE001 - a picture must not stop training
        logger.warning("epoch %d: image grids not made: %s: %s", epoch, type(err).__name__, err)
    finally:
        model.train()


def _stop(run_dir: str, host: LoopHost, record: dict[str, Any]) -> None:
    """End training on every rank: rank 0 records why for the driver; all ranks report it (so
    that a Tune callback sees it at this epoch) and return instead of raising, which Ray would
    answer by restarting the workers."""
    if host.rank == 0:
        storage.write_text(storage.join(run_dir, STOP_FILE), json.dumps(record))
    host.report(record)


def read_stop_record(run_dir: str) -> dict[str, Any] | None:
    """The record of a run's workers stopping on an unfixable error, or None."""
    location = storage.join(run_dir, STOP_FILE)
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def raise_for_stop(record: dict[str, Any] | None) -> None:
    """Raise the error a stop record describes (NonFiniteError or CorruptCheckpointError)."""
    if not record:
        return
    failure = NonFiniteError.from_report(record)
    if failure is not None:
        raise failure
    if CORRUPT_REPORT_KEY in record:
        raise CorruptCheckpointError(record[CORRUPT_REPORT_KEY])


def clear_stop_record(run_dir: str) -> None:
    """Forget an earlier stop before the run is fitted again (e.g. resumed with a lower lr)."""
    location = storage.join(run_dir, STOP_FILE)
    if storage.is_file(location):
        fs, path = storage.resolve(location)
        fs.delete_file(path)


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
    slowest = _all_reduce(slowest, device, op="max")
    train_sums = _all_reduce(train_sums, device) | {"first_batch_s": slowest["first_batch_s"]}
    val_sums = _all_reduce(val_sums, device)
    epoch_time = _all_reduce({"t": time.perf_counter() - epoch_start}, device, op="max")["t"]
    return epoch_metrics(epoch, train_sums, val_sums, slowest["time_s"], epoch_time, lr)


def _rank0_logger(plan: LoopPlan) -> RunLogger | None:
    """Rank 0's MLflow logger for the driver's run (None when the run is not tracked)."""
    if not plan.tracked:
        return None
    return RunLogger(plan.tracking_uri, plan.run_id, spool=storage.join(plan.run_dir, SPOOL_DIR))


def _announce_restore(tracker: RunLogger, restored: _Restored) -> None:
    epoch = restored.state.epoch
    logger.info("rank 0 resumes after epoch %d from %s", epoch, restored.path)
    tags = {"mvtcae.restored_from": restored.path}
    for note in restored.skipped:
        logger.warning("skipped corrupt checkpoint %s", note)
    if restored.skipped:
        tags["mvtcae.corrupt_checkpoints_skipped"] = " | ".join(restored.skipped)
    tracker.set_tags(tags)
    # Restored from this checkpoint before (a resume after a resume): the step is there.
    if epoch not in tracker.logged_steps(RESUMED_AFTER_KEY):
        tracker.log_metrics({RESUMED_AFTER_KEY: epoch}, epoch)


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
    rng_states = _gather_rng_states(world)
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
