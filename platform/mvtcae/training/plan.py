"""The plan of a run's worker loop: everything every worker is given, typed and validated once,
on the driver (or the sweep trial), and pickled to the workers.

`plan_loop` validates and opens the run's input (held splits in the object store, or Ray
Datasets) and builds the `LoopPlan` (the TrainSection, the MVTCAEConfig, where the run and its
data live, how rank 0 tracks it) that `mvtcae.training.loop` runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mvtcae.data as data_layer
from mvtcae import MVTCAEConfig, storage
from mvtcae.config import EvaluationSection, ExperimentConfig, TrainSection
from mvtcae.data import open_splits
from mvtcae.data.files import DatasetError, dataset_files
from mvtcae.data.held import put_splits
from mvtcae.data.ray_input import should_materialize
from mvtcae.storage import ray_session
from mvtcae.training.phases import PhaseTimes, timed
from mvtcae.training.step import model_config_for

PLAN_KEY = "plan"
"""The one key of the ``train_loop_config`` that carries a run's `LoopPlan` to its workers."""


@dataclass(frozen=True)
class EpochObjectives:
    """A sweep's objectives, measured by rank 0 on ``split`` after every epoch."""

    names: tuple[str, ...]
    measures: EvaluationSection
    split: str


@dataclass(frozen=True)
class ImageGrids:
    """Rank 0's epoch image grids: every ``every`` epochs (0: never), ``samples`` rows of
    ``split``."""

    every: int
    samples: int
    split: str


@dataclass(frozen=True)
class LoopPlan:
    """What every worker of a run is given (see the module docstring)."""

    train: TrainSection
    model: MVTCAEConfig
    dataset_dir: str
    run_dir: str
    """The run's directory in run storage (checkpoints, stop record, metric spools)."""
    threads_per_worker: int
    shuffle_buffer: int
    images: ImageGrids
    held_splits: dict[str, Any] | None = None
    """Object-store references of the "train" and "val" splits' arrays when the driver holds
    them; the driver (or trial) that put them keeps them alive for the whole fit, worker
    restarts included. None: the workers read Ray Dataset shards."""
    objectives: EpochObjectives | None = None
    """A sweep trial's objectives, measured after every epoch; None outside a sweep."""
    run_id: str | None = None
    tracking_uri: str | None = field(default=None, repr=False)  # may hold credentials
    tracking_grace_s: float = 120.0
    system_metrics_interval_s: float = 0.0
    watch_preemption: bool = False
    """Whether the workers ask Ray Train for preemption notices (`train.checkpoint.on_preemption`
    on a Ray that sends them, outside sweeps)."""

    def __post_init__(self) -> None:
        if not isinstance(self.train, TrainSection) or not isinstance(self.model, MVTCAEConfig):
            raise TypeError("a LoopPlan needs a TrainSection and an MVTCAEConfig")
        if self.threads_per_worker < 1 or self.shuffle_buffer < 0:
            raise ValueError(
                f"threads_per_worker {self.threads_per_worker} must be >= 1 and shuffle_buffer "
                f"{self.shuffle_buffer} >= 0"
            )
        if self.held_splits is not None and set(self.held_splits) != {"train", "val"}:
            raise ValueError(
                f"held_splits must be 'train' and 'val', not {sorted(self.held_splits)}"
            )

    @property
    def tracked(self) -> bool:
        """Whether rank 0 logs to an MLflow run."""
        return bool(self.run_id and self.tracking_uri)


@dataclass(frozen=True)
class FitPlan:
    """A planned fit: the workers' `LoopPlan`, and the Ray Datasets they read (None when the
    splits are held, their references then in the plan)."""

    loop: LoopPlan
    datasets: dict[str, Any] | None


@dataclass(frozen=True)
class InputPlan:
    """How the workers get their data (``data.hold_in_workers``, ``data.materialize``; the
    automatic choices decided): held, every split read once by the driver into the object
    store and sampled by each worker (`mvtcae.data.held`); else Ray Data datasets split across
    the workers, materialised in the object store or streamed from the shards every epoch."""

    held: bool
    materialize: bool


def input_plan(cfg: ExperimentConfig, manifest: Any) -> InputPlan:
    """The config's input choices for this dataset and cluster (a connected Ray session is
    needed to size the object store)."""
    data = cfg.data
    materialize = should_materialize(manifest) if data.materialize is None else data.materialize
    held = materialize if data.hold_in_workers is None else data.hold_in_workers
    return InputPlan(held=held, materialize=materialize)


def val_split_name(cfg: ExperimentConfig, manifest: Any) -> str:
    """The split validated every epoch: data.val_split, else 'val' if present, else 'test'."""
    return cfg.data.val_split or ("val" if "val" in manifest.splits else "test")


def check_splits(cfg: ExperimentConfig, dataset_dir: str, manifest: Any) -> None:
    """Refuse a dataset without the splits training reads: 'train' and the validation split."""
    val_name = val_split_name(cfg, manifest)
    if "train" not in manifest.splits or val_name not in manifest.splits:
        raise DatasetError(
            f"dataset {dataset_dir} has splits {sorted(manifest.splits)}; training needs "
            f"'train' and '{val_name}' (data.val_split; `mvtcae data prepare arrays "
            "--test-fraction` splits one off)"
        )


def worker_resources(cfg: TrainSection, use_gpu: bool) -> dict[str, float]:
    """What each training worker holds: ``train.resources_per_worker`` (1 CPU by default), and
    a GPU when used."""
    resources = dict(cfg.resources_per_worker or {"CPU": 1.0})
    if use_gpu:
        resources.setdefault("GPU", 1.0)
    return resources


def threads_per_worker(cfg: TrainSection) -> int:
    """Torch threads per worker: ``train.threads_per_worker``, else the worker's CPUs."""
    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    return max(1, int(round(worker_resources(cfg, False).get("CPU", 1.0))))


def _training_input(
    cfg: ExperimentConfig,
    dataset_dir: str,
    manifest: Any,
    plan: InputPlan,
    phases: PhaseTimes | None = None,
) -> dict[str, Any]:
    """The train and validation splits, validated first: object-store references of their
    arrays when held, else Ray Datasets."""
    val_name = val_split_name(cfg, manifest)
    check_splits(cfg, dataset_dir, manifest)
    with timed(phases, "validation"):
        files = dataset_files(dataset_dir)
        data_layer.ensure_valid(files, full=cfg.data.revalidate)
    with timed(phases, "dataset_open"):
        if plan.held:
            refs = put_splits(files, ["train", val_name])
            return {"train": refs["train"], "val": refs[val_name]}
        splits = open_splits(
            files,
            materialize=plan.materialize,
            seed=cfg.train.seed,
            validate=False,
            reshuffle_each_epoch=cfg.data.reshuffle_shards_each_epoch,
            splits=["train", val_name],
        )
    return {"train": splits["train"], "val": splits[val_name]}


def plan_loop(
    cfg: ExperimentConfig,
    run_name: str,
    dataset_dir: str,
    manifest: Any,
    run_id: str | None,
    tracking_uri: str | None,
    objectives: EpochObjectives | None = None,
    phases: PhaseTimes | None = None,
) -> FitPlan:
    """The worker loop's plan and input for this run (the input validated and opened).

    ``objectives`` makes rank 0 measure a sweep's objectives after every epoch and report them.
    """
    tc = cfg.train
    choice = input_plan(cfg, manifest)
    splits = _training_input(cfg, dataset_dir, manifest, choice, phases)
    loop = LoopPlan(
        train=tc,
        model=model_config_for(cfg.model, manifest),
        dataset_dir=str(dataset_dir),
        run_dir=storage.join(tc.storage_path, run_name),
        threads_per_worker=threads_per_worker(tc),
        shuffle_buffer=cfg.data.shuffle_buffer,
        images=ImageGrids(
            every=cfg.eval.images_every_n_epochs,
            samples=cfg.eval.grid_samples,
            split=val_split_name(cfg, manifest),
        ),
        held_splits=splits if choice.held else None,
        objectives=objectives,
        run_id=run_id,
        tracking_uri=tracking_uri,
        tracking_grace_s=cfg.tracking.outage_grace_s,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
        watch_preemption=(
            tc.checkpoint.on_preemption and objectives is None and ray_session.preemption_watched()
        ),
    )
    return FitPlan(loop=loop, datasets=None if choice.held else splits)
