"""What rank 0 adds to the epochs of a run: its MLflow logger, the node's system metrics, a sweep's
objectives measured on the validation split, image grids, and the note of a restore.
"""

from __future__ import annotations

import functools
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from mvtcae import MVTCAE, storage
from mvtcae.config import TrainSection
from mvtcae.evaluation import evaluate
from mvtcae.evaluation.plots import image_grids, image_modalities
from mvtcae.evaluation.split import load_eval_split
from mvtcae.storage.checkpoints import TrainerState
from mvtcae.tracking.run_logger import SPOOL_DIR, RunLogger, client_uri
from mvtcae.training.plan import LoopPlan

logger = logging.getLogger(__name__)


RESUMED_AFTER_KEY = "train/resumed_after_epoch"
"""Logged at the epoch a run restored from (once per epoch, however often it restored there)."""
WORLD_SIZE_KEY = "train/world_size"
"""The number of workers an epoch ran on (an elastic run's changes at a restart)."""
RESIZE_TAG_PREFIX = "mvtcae.resize.after_epoch_"
"""A run's tag for each restart on another number of workers: ``<prefix>NNNN: 3 -> 2 workers``."""
PREEMPTION_TAG_PREFIX = "mvtcae.preemption.epoch_"
"""A run's tag for each preemption notice it checkpointed on: ``<prefix>EEEE_step_SSSSSS``, the
nodes drained and the time that was left."""


@contextmanager
def system_metrics(plan: LoopPlan, rank: int, sampler: bool) -> Iterator[None]:
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


def to_val_names(metrics: dict[str, float]) -> dict[str, float]:
    """An evaluation's ``eval/x`` metrics as ``val/x`` (they were measured on validation)."""
    return {"val/" + k.removeprefix("eval/"): float(v) for k, v in metrics.items()}


def epoch_objectives(
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


def log_epoch_images(
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


def rank0_logger(plan: LoopPlan) -> RunLogger | None:
    """Rank 0's MLflow logger for the driver's run (None when the run is not tracked)."""
    if not plan.tracked:
        return None
    return RunLogger(plan.tracking_uri, plan.run_id, spool=storage.join(plan.run_dir, SPOOL_DIR))


def announce_world(
    tracker: RunLogger,
    cfg: TrainSection,
    world: int,
    after_epoch: int = 0,
    was: int | None = None,
) -> None:
    """Say when an elastic run trains below its max, and tag a restart on another number of
    workers than the checkpoint was written by (``mvtcae.resize.after_epoch_NNNN``)."""
    if cfg.elastic and world < cfg.max_workers:
        logger.info(
            "training on %d of up to %d workers (train.num_workers [%d, %d]); it grows "
            "when capacity comes, checked every %g s",
            world,
            cfg.max_workers,
            cfg.min_workers,
            cfg.max_workers,
            cfg.elastic_resize_check_s,
        )
    if was is not None and was != world:
        logger.info("resized after epoch %d: %d -> %d workers", after_epoch, was, world)
        tracker.set_tags({f"{RESIZE_TAG_PREFIX}{after_epoch:04d}": f"{was} -> {world} workers"})


def announce_restore(
    tracker: RunLogger, state: TrainerState, path: str, skipped: list[str]
) -> None:
    """Log the restore, and tag and log it on the run (once per restore point)."""
    epoch = state.epoch
    where = f"epoch {epoch + 1} at step {state.step}" if state.step else f"after epoch {epoch}"
    logger.info("rank 0 resumes %s from %s", where, path)
    tags = {"mvtcae.restored_from": path}
    for note in skipped:
        logger.warning("skipped corrupt checkpoint %s", note)
    if skipped:
        tags["mvtcae.corrupt_checkpoints_skipped"] = " | ".join(skipped)
    tracker.set_tags(tags)
    # Restored from this checkpoint before (a resume after a resume): the step is there.
    if epoch not in tracker.logged_steps(RESUMED_AFTER_KEY):
        tracker.log_metrics({RESUMED_AFTER_KEY: epoch}, epoch)
