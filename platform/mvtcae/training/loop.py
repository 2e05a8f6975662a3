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

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig, storage
from mvtcae.config import EvaluationSection, TrainSection
from mvtcae.data import iter_model_batches, load_manifest
from mvtcae.data.held import HeldSplit
from mvtcae.evaluation import evaluate
from mvtcae.evaluation.plots import image_grids, image_modalities
from mvtcae.evaluation.split import load_eval_split
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

    def __init__(self, split: str, loop_cfg: dict[str, Any], manifest: Any, batch_size: int,
                 device: torch.device, host: LoopHost, *, shuffle_buffer: int = 0,
                 seed: int = 0) -> None:  # fmt: skip
        self.split, self.manifest, self.batch_size = split, manifest, batch_size
        self.device, self.host, self.rank, self.world = device, host, host.rank, host.world
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.held_ref = (loop_cfg.get("held_splits") or {}).get(split)
        self._held: HeldSplit | None = None

    def batches(self, epoch: int, limit: int | None = None) -> Iterator[MultimodalBatch]:
        """This epoch's batches (at most ``limit``)."""
        shuffle = self.shuffle_buffer > 0
        if self.held_ref is not None:
            if self._held is None:
                self._held = HeldSplit.fetch(self.held_ref, self.manifest, self.device)
            # Training shares must be equal (DDP steps in lockstep); validation uses every row.
            rows = self._held.rank_rows(self.rank, self.world, shuffle=shuffle, seed=self.seed,
                                        epoch=epoch, equal=self.split == "train")  # fmt: skip
            batches = self._held.batches(rows, self.batch_size)
        else:
            batches = iter_model_batches(
                self.host.shard(self.split), self.manifest, self.batch_size,
                device=self.device, shuffle=shuffle,
                local_shuffle_buffer_size=self.shuffle_buffer or None,
                seed=data_order_seed(self.seed, self.rank), epoch=epoch,
            )  # fmt: skip
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


def _restore(checkpoint: Any, cfg: TrainSection, device: torch.device, rank: int, world: int,
             seed: int) -> _Restored:  # fmt: skip
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


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    """Ray Train worker: restore, train with DDP, validate, report and checkpoint every epoch.

    Non-finite values stop every rank at the same step; the workers then report the reason
    (`NonFiniteError.to_report`) and return, so that Ray does not restart them for it.
    """
    run_loop(loop_cfg, RayTrainHost())


@dataclass
class InProcessResult:
    """What an in-process fit ends with: the last report's metrics and checkpoint (as the
    ``metrics`` and ``checkpoint`` of Ray Train's ``Result``)."""

    metrics: dict[str, Any]
    checkpoint: ray.train.Checkpoint | None


def train_in_process(loop_cfg: dict[str, Any], datasets: dict[str, Any] | None = None,
                     *, report_to_tune: bool = False) -> InProcessResult:  # fmt: skip
    """The worker loop as the only worker, in this process (`InProcessHost`): checkpoints go
    to ``loop_cfg["run_dir"]``, the run resumes from its newest one, and with
    ``report_to_tune`` every epoch is reported to the Tune trial this runs in."""
    train = TrainSection.model_validate(loop_cfg["train"])
    if train.num_workers != 1:
        raise ValueError(f"training in process needs train.num_workers 1, not {train.num_workers}")
    host = InProcessHost(run_dir=loop_cfg["run_dir"], keep=train.checkpoint.num_to_keep,
                         datasets=datasets, to_tune=report_to_tune)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        run_loop(loop_cfg, host)
    finally:
        torch.set_num_threads(threads)  # the caller's process goes on with its own setting
    run_id = loop_cfg.get("run_id")
    host.report_restored_again({RUN_ID_KEY: run_id} if run_id else None)
    return InProcessResult(metrics=host.last_metrics, checkpoint=host.last_checkpoint)


def run_loop(loop_cfg: dict[str, Any], host: LoopHost) -> None:
    """Restore, train, validate, report and checkpoint every epoch, as one worker of ``host``."""
    _worker_logging()
    cfg = TrainSection.model_validate(loop_cfg["train"])
    rank = host.rank
    torch.set_num_threads(int(loop_cfg["threads_per_worker"]))
    _seed_everything(cfg.seed + rank)
    device = host.device()
    if cfg.precision == "bf16" and rank == 0 and not bf16_supported(device):
        logger.warning("%s has no native bf16; bf16 autocast will be slow", device)
    manifest = load_manifest(loop_cfg["dataset_dir"])
    tracker = _rank0_logger(loop_cfg) if rank == 0 else None
    with _system_metrics(loop_cfg, rank, sampler=host.local_rank == 0):
        _train(loop_cfg, cfg, host, device, manifest, tracker)


@contextmanager
def _system_metrics(loop_cfg: dict[str, Any], rank: int, sampler: bool) -> Iterator[None]:
    """MLflow's system metrics of this worker's machine, into the run as ``system/rank<k>/...``
    when this worker is its node's ``sampler`` (its first worker): one series per node, named
    by that worker's rank, so that nodes do not overwrite each other and no machine is sampled
    twice (each monitor also costs its worker an MLflow client: over a second at start with a
    SQLite store)."""
    interval = float(loop_cfg.get("system_metrics_interval_s") or 0)
    if (
        not sampler
        or interval <= 0
        or not loop_cfg.get("run_id")
        or not loop_cfg.get("tracking_uri")
    ):
        yield
        return
    try:  # imported here: it needs psutil, and training goes on without it
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            loop_cfg["run_id"], sampling_interval=interval, node_id=f"rank{rank}",
            tracking_uri=client_uri(loop_cfg["tracking_uri"]), resume_logging=True,
        )  # fmt: skip
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


def _train(loop_cfg: dict[str, Any], cfg: TrainSection, host: LoopHost,
           device: torch.device, manifest: Any, tracker: RunLogger | None) -> None:  # fmt: skip
    """The worker's epochs, from a restored checkpoint or from scratch."""
    rank, world = host.rank, host.world
    checkpoint = host.restore_point()
    start_epoch, skipped_before, dir_suffix = 1, 0, ""
    logged: set[int] = set()
    if checkpoint is not None:
        try:
            restored = _restore(checkpoint, cfg, device, rank, world, cfg.seed + rank)
        except CorruptCheckpointError as err:  # a restart would meet the same files: stop
            _stop(loop_cfg, host, {CORRUPT_REPORT_KEY: str(err)})
            return
        model, optimizer, scheduler = restored.model, restored.optimizer, restored.scheduler
        start_epoch = restored.state.epoch + 1
        skipped_before = int(restored.state.metrics.get("train/skipped_steps_total", 0))
        if restored.skipped:  # epochs whose (corrupt) checkpoints exist are trained again
            dir_suffix = uuid.uuid4().hex[:6]
        if tracker is not None:
            _announce_restore(tracker, restored)
            # Epochs the run logged after this checkpoint, before the process died: trained
            # again from it (the same numbers), but not logged twice.
            logged = {s for s in tracker.logged_steps("val/loss") if s >= start_epoch}
    else:
        model = MVTCAE(MVTCAEConfig.from_dict(loop_cfg["model_config"])).to(device)
        optimizer = build_optimizer(model.named_parameters(), cfg)
        scheduler = build_scheduler(optimizer, cfg)
    ddp_model = host.wrap_model(model)
    guard = StepGuard(cfg.on_nonfinite, cfg.max_nonfinite_steps, _min_over_workers, skipped_before)

    local_batch = max(1, cfg.batch_size // world)
    train_input = _EpochInput("train", loop_cfg, manifest, local_batch, device, host,
                              shuffle_buffer=int(loop_cfg["shuffle_buffer"]), seed=cfg.seed)  # fmt: skip
    val_input = _EpochInput("val", loop_cfg, manifest, local_batch, device, host)
    if tracker is not None:
        held = train_input.held_ref is not None
        tracker.set_tags(
            {"mvtcae.data.input": "held" if held else "ray data", "mvtcae.train.host": host.kind}
        )
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            epoch_start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_batches = train_input.batches(epoch, limit=cfg.max_batches_per_epoch)
            train_sums = run_train_epoch(ddp_model, train_batches, optimizer, device, cfg,
                                         epoch=epoch, guard=guard)  # fmt: skip
            scheduler.step()
            val_sums = run_validation(model, val_input.batches(epoch))
            metrics = _group_metrics(epoch, train_sums, val_sums, epoch_start, lr, device)
            metrics["train/skipped_steps_total"] = float(guard.skipped)
            objectives_start = time.perf_counter()
            metrics.update(_epoch_objectives(model, loop_cfg, rank, device))
            if loop_cfg.get("epoch_eval"):
                metrics["perf/objectives_time_s"] = time.perf_counter() - objectives_start
            bad = nonfinite_values(metrics)
            # Losses are all-reduced, the objectives rank 0's: agree before stopping together.
            if _all_reduce({"bad": float(bool(bad))}, device, op="max")["bad"] > 0:
                raise NonFiniteError(epoch, None, bad or {"(rank 0's objectives)": float("nan")})
            report_start = time.perf_counter()
            epoch_tracker = None if epoch in logged else tracker
            _report(metrics, epoch, host, model, optimizer, scheduler, cfg, epoch_tracker,
                    checkpoint_dir_name(epoch, dir_suffix), loop_cfg.get("run_id"))  # fmt: skip
            if epoch_tracker is not None:
                images_start = time.perf_counter()
                _log_epoch_images(model, loop_cfg, epoch_tracker, epoch, device)
                # After the report, so logged beside it: what checkpointing and images cost.
                epoch_tracker.log_metrics({"perf/report_s": images_start - report_start,
                                           "perf/images_s": time.perf_counter() - images_start},
                                          epoch)  # fmt: skip
    except NonFiniteError as err:
        if tracker is not None:
            logger.error("%s", err)
            tracker.set_tags({"mvtcae.nonfinite": str(err)})
        # The objectives are undefined for this epoch; a sweep records the trial as failed here.
        nan_objectives = dict.fromkeys(loop_cfg.get("objectives") or [], float("nan"))
        _stop(loop_cfg, host, err.to_report() | nan_objectives)
    finally:
        if tracker is not None:
            tracker.close(float(loop_cfg["tracking_grace_s"]))


def to_val_names(metrics: dict[str, float]) -> dict[str, float]:
    """An evaluation's ``eval/x`` metrics as ``val/x`` (they were measured on validation)."""
    return {"val/" + k.removeprefix("eval/"): float(v) for k, v in metrics.items()}


def _epoch_objectives(model: MVTCAE, loop_cfg: dict[str, Any], rank: int,
                      device: torch.device) -> dict[str, float]:  # fmt: skip
    """Rank 0, in a sweep trial: the objectives' measures of this epoch's model on the validation
    split (the evaluation forks the generators, so training's random stream is untouched)."""
    if rank != 0 or not loop_cfg.get("epoch_eval"):
        return {}
    cfg = EvaluationSection.model_validate(loop_cfg["epoch_eval"])
    try:
        report = evaluate(model, loop_cfg["dataset_dir"], cfg, split=loop_cfg["val_split"],
                          device=device)  # fmt: skip
        return to_val_names(report.metrics)
    except Exception as err:  # noqa: BLE001 - a diverged model can break the probe or the NLL
        logger.warning("validation measures failed: %s: %s", type(err).__name__, err)
        return dict.fromkeys(loop_cfg.get("objectives") or [], float("nan"))
    finally:
        model.train()


@functools.lru_cache(maxsize=1)
def _grid_split(dataset_dir: str, split: str, max_rows: int) -> Any:
    """The validation samples of the epoch grids, read once per worker (the same every epoch)."""
    return load_eval_split(dataset_dir, split, max_rows=max_rows)


def _log_epoch_images(model: MVTCAE, loop_cfg: dict[str, Any], tracker: RunLogger, epoch: int,
                      device: torch.device) -> None:  # fmt: skip
    """Rank 0, every ``images.every`` epochs: reconstruction and cross-modal grids of the same
    validation samples, as MLflow images at this epoch (image modalities only)."""
    images = loop_cfg.get("images") or {}
    every = int(images.get("every") or 0)
    if every <= 0 or epoch % every or not image_modalities(model):
        return
    try:
        split = _grid_split(loop_cfg["dataset_dir"], images["split"], 16 * int(images["samples"]))
        with tempfile.TemporaryDirectory(prefix="mvtcae-grids-") as scratch:
            grids = image_grids(model, split, int(images["samples"]), Path(scratch), device)
            tracker.log_images(grids, epoch)
    except Exception as err:  # noqa: BLE001 - a picture must not stop training
        logger.warning("epoch %d: image grids not made: %s: %s", epoch, type(err).__name__, err)
    finally:
        model.train()


def _stop(loop_cfg: dict[str, Any], host: LoopHost, record: dict[str, Any]) -> None:
    """End training on every rank: rank 0 records why for the driver; all ranks report it (so
    that a Tune callback sees it at this epoch) and return instead of raising, which Ray would
    answer by restarting the workers."""
    if host.rank == 0 and loop_cfg.get("run_dir"):
        storage.write_text(storage.join(loop_cfg["run_dir"], STOP_FILE), json.dumps(record))
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


def _group_metrics(epoch: int, train_sums: dict[str, float], val_sums: dict[str, float],
                   epoch_start: float, lr: float, device: torch.device) -> dict[str, float]:  # fmt: skip
    """The epoch's metrics from every rank's sums (sums added, times the slowest rank's)."""
    slowest = {"time_s": train_sums.pop("time_s"), "first_batch_s": train_sums.pop("first_batch_s")}
    slowest = _all_reduce(slowest, device, op="max")
    train_sums = _all_reduce(train_sums, device) | {"first_batch_s": slowest["first_batch_s"]}
    val_sums = _all_reduce(val_sums, device)
    epoch_time = _all_reduce({"t": time.perf_counter() - epoch_start}, device, op="max")["t"]
    return epoch_metrics(epoch, train_sums, val_sums, slowest["time_s"], epoch_time, lr)


def _rank0_logger(loop_cfg: dict[str, Any]) -> RunLogger | None:
    """Rank 0's MLflow logger for the driver's run (None when the run is not tracked)."""
    if not loop_cfg.get("run_id") or not loop_cfg.get("tracking_uri"):
        return None
    spool = storage.join(loop_cfg["run_dir"], SPOOL_DIR) if loop_cfg.get("run_dir") else None
    return RunLogger(loop_cfg["tracking_uri"], loop_cfg["run_id"], spool=spool)


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


def _worker_logging() -> None:
    """Send the ``mvtcae`` loggers' INFO and above to the driver's output, once per process."""
    package = logging.getLogger("mvtcae")
    if not any(isinstance(h, _WorkerHandler) for h in package.handlers):
        package.addHandler(_WorkerHandler(sys.stdout))
        package.setLevel(logging.INFO)
        package.propagate = False


def _report(metrics: dict[str, float], epoch: int, host: LoopHost, model: MVTCAE,
            optimizer: Any, scheduler: Any, cfg: TrainSection, tracker: RunLogger | None,
            dir_name: str, run_id: str | None) -> None:  # fmt: skip
    """Every rank reports; rank 0 alone logs to MLflow and passes a checkpoint (and names its
    MLflow run, so that a sweep can link the trial to it)."""
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
        save_checkpoint(tmp, model, optimizer, scheduler, state, rng_states)
        host.report(reported, checkpoint_dir=tmp, dir_name=dir_name)
