"""The experiment config: one validated pydantic model per section, YAML in and out.

Defaults run the demo on a laptop: UCI Multiple Features (six views, shipped in a wheel), two
CPU workers on a local Ray, a SQLite MLflow store. Relative paths are resolved against the
working directory once, when the config is built, because Ray workers run in their own session
directories.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from mvtcae.config import locations
from mvtcae.config.base import (
    ConfigError,
    Section,
    apply_overrides,
    format_errors,
    read_yaml_mapping,
)
from mvtcae.config.evaluation import EvaluationSection
from mvtcae.config.tracking import TrackingSection
from mvtcae.model.model_config import DISTRIBUTIONS
from mvtcae.safety.names import check_name

# Cluster-wide defaults (set by `mvtcae cluster`, a KubeRay ConfigMap or by hand) for jobs whose
# config leaves the dataset directory or the run storage unset.
DATA_DIR_ENV = "MVTCAE_DATA_DIR"
STORAGE_PATH_ENV = "MVTCAE_STORAGE_PATH"


class DataSection(Section):
    """Which dataset to train on and how to prepare and read it."""

    dataset: Literal["polymnist", "mfeat", "custom"] = "mfeat"
    dir: str | None = Field(
        default_factory=lambda: os.environ.get(DATA_DIR_ENV) or None,
        validate_default=True,
        description=f"dataset location: a local directory, file:///abs/dir, s3://bucket/prefix "
        f"or gs://bucket/prefix; default ${DATA_DIR_ENV} when set, else data/<dataset> "
        "(data/polymnist-<n_train> for PolyMNIST)",
    )
    revalidate: bool = Field(
        default=False,
        description="check every shard in full on every run; off, a dataset fully validated "
        "before whose shards are unchanged (same manifest digest, sizes and times) is trusted",
    )
    prepare_if_missing: bool | None = Field(
        default=None,
        description="write the built-in dataset when `dir` holds none: None (auto) only at its "
        "default location (data/<dataset> under the working directory), so that a mistyped "
        "`dir` is an error and not a new dataset; true into any `dir`; false never",
    )
    n_train: int = Field(default=5000, ge=10, description="PolyMNIST training tuples to write")
    n_test: int = Field(default=1000, ge=10, description="PolyMNIST test tuples to write")
    missing_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    seed: int = 0
    val_split: str | None = Field(
        default=None,
        description="split validated each epoch; default 'val' if present, else 'test'",
    )
    materialize: bool | None = Field(
        default=None,
        description="hold the splits in the object store; None lets the data layer decide",
    )
    shuffle_buffer: int = Field(
        default=2048, ge=0, description="local shuffle buffer rows per worker"
    )
    reshuffle_shards_each_epoch: bool = Field(
        default=False,
        description="draw a new shard/block order every epoch; off, the order is fixed by "
        "train.seed and rows are reshuffled per epoch in the shuffle buffer, so that a resumed "
        "run sees exactly the data order of an uninterrupted one",
    )

    @field_validator("dir", mode="before")
    @classmethod
    def _resolve_dir(cls, v: object) -> str | None:
        if v is None:
            return None
        if not isinstance(v, str | os.PathLike):
            raise ValueError(f"expected a path or URI, got {type(v).__name__}")
        return locations.normalize(v)

    hold_in_workers: bool | None = Field(
        default=None,
        description="the driver reads train and val once into Ray's object store and each "
        "worker samples its share every epoch, without Ray Data; None holds when the dataset "
        "is materialised (see materialize)",
    )

    @model_validator(mode="after")
    def _custom_needs_dir(self) -> DataSection:
        if self.dataset == "custom" and self.dir is None:
            raise ValueError("data.dir is required when data.dataset is 'custom'")
        return self

    @model_validator(mode="after")
    def _hold_needs_memory(self) -> DataSection:
        if self.hold_in_workers and self.materialize is False:
            raise ValueError(
                "data.hold_in_workers: true reads the whole dataset into memory, but "
                "data.materialize: false asks to stream it; set one of them differently"
            )
        return self

    def resolved_dir(self) -> str:
        """The dataset location: an absolute local path or a URI (the default directory when
        none is configured)."""
        return self.dir if self.dir is not None else self.default_dir()

    def default_dir(self) -> str:
        """Where the built-in dataset lives unless ``dir`` says otherwise: data/mfeat,
        data/polymnist-<n_train> (under the working directory)."""
        name = f"{self.dataset}-{self.n_train}" if self.dataset == "polymnist" else self.dataset
        return str(Path("data", name).resolve())

    def may_prepare(self) -> bool:
        """Whether a missing dataset at `resolved_dir` is to be written (see
        ``prepare_if_missing``)."""
        if self.dataset == "custom" or self.prepare_if_missing is False:
            return False
        return self.prepare_if_missing or self.resolved_dir() == self.default_dir()


class ModelSection(Section):
    """MVTCAE hyperparameters; shapes and default likelihoods come from the dataset manifest.

    Its defaults are the platform's, those of the MVTCAE paper's runs (latent_dim 32, α 5/6,
    β 2.5), not `mvtcae.MVTCAEConfig`'s, which keep multivae's API (latent_dim 10, α 0.1):
    `mvtcae.training.model_config_for` passes every field of this section on, so a run's model
    is what this section says, set or not.
    """

    latent_dim: int = Field(default=32, ge=1, description="the platform's default (multivae: 10)")
    alpha: float = Field(
        default=5 / 6, ge=0.0, le=1.0, description="5/6, the MVTCAE paper's (multivae: 0.1)"
    )
    beta: float = Field(default=2.5, gt=0.0)
    networks: Literal["mlp", "conv"] = "mlp"
    decoders_dist: dict[str, str] | None = Field(
        default=None, description="{modality: distribution}; missing ones use the manifest's"
    )
    decoder_scale: float | dict[str, float] | None = Field(
        default=1.0, description="scale of normal/laplace likelihoods: one value or per modality"
    )
    uses_likelihood_rescaling: bool = False
    rescale_factors: dict[str, float] | None = None

    @field_validator("decoders_dist")
    @classmethod
    def _known_distributions(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for modality, dist in (v or {}).items():
            if dist not in DISTRIBUTIONS:
                raise ValueError(
                    f"modality {modality!r}: unknown distribution {dist!r}; use one of {DISTRIBUTIONS}"
                )
        return v

    @field_validator("decoder_scale")
    @classmethod
    def _positive_scale(cls, v: float | dict[str, float] | None) -> float | dict[str, float] | None:
        values = v.items() if isinstance(v, dict) else [("all", v)]
        for modality, scale in values:
            if scale is not None and scale <= 0:
                raise ValueError(f"modality {modality!r}: scale must be > 0, got {scale}")
        return v


class OptimizerSection(Section):
    """Optimizer and its hyperparameters."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(default=0.9, ge=0.0, description="sgd only")
    fused: bool = Field(
        default=True,
        description="adam/adamw: torch's fused kernels (one pass over all parameters, ~3.5x "
        "faster steps on CPU); false: the per-tensor path (the same algorithm)",
    )


class ScheduleSection(Section):
    """Learning-rate schedule, stepped once per epoch."""

    name: Literal["constant", "cosine", "step"] = "constant"
    warmup_epochs: int = Field(default=0, ge=0, description="linear warm-up from lr/10")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="cosine floor, times lr")
    step_epochs: int = Field(default=30, ge=1, description="step schedule: epochs between decays")
    gamma: float = Field(default=0.5, gt=0.0, le=1.0, description="step schedule: decay factor")


class CheckpointSection(Section):
    """When checkpoints are written, and which are kept.

    Every epoch ends with one. ``every_steps`` and ``every_minutes`` add checkpoints inside an
    epoch, so that a restart (a resize, a preemption, a failure) repeats at most that much work;
    ``on_preemption`` adds one at the first step boundary after Ray Train says a node of the run
    is being drained. A restart resumes from the newest checkpoint, mid-epoch included.
    """

    num_to_keep: int = Field(
        default=2,
        ge=1,
        description="epoch checkpoints kept, best first by `metric` (the newest checkpoint, "
        "mid-epoch or not, is kept as well)",
    )
    metric: str = "val/loss"
    mode: Literal["min", "max"] = "min"
    every_steps: int | None = Field(
        default=None,
        ge=1,
        description="also checkpoint every N optimisation steps inside an epoch (None: only at "
        "epoch ends); training runs only, not sweep trials",
    )
    every_minutes: float | None = Field(
        default=None,
        gt=0.0,
        description="also checkpoint inside an epoch once this many minutes passed since the "
        "last checkpoint (checked every few steps); training runs only, not sweep trials",
    )
    on_preemption: bool = Field(
        default=True,
        description="checkpoint at the next step boundary when a node of the run is being "
        "drained for preemption (ray.train.get_preemption_info); training runs only",
    )

    @property
    def mid_epoch(self) -> bool:
        """Whether checkpoints are written inside epochs on a schedule."""
        return self.every_steps is not None or self.every_minutes is not None


class TrainSection(Section):
    """The Ray Train run: scaling, optimisation, precision, checkpoints and recovery."""

    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=128, ge=1, description="global batch, split across workers")
    num_workers: int | tuple[int, int] = Field(
        default=2,
        description="N workers, or [min, max] for an elastic run: it starts as soon as min fit, "
        "grows to max when capacity comes (a restart from the newest checkpoint) and goes on "
        "with fewer when a node is lost; the global batch stays batch_size (each of W workers "
        "takes batch_size // W rows a step, so when W does not divide it the step's batch is "
        "batch_size - batch_size % W)",
    )
    worker_start_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description="how long Ray Train waits for a worker group to start before it gives up and "
        "retries with what the cluster has (Ray's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s "
        "by default; that variable wins when set). Ray may count a node it just lost for a few "
        "seconds, and an elastic run then waits this long before it restarts on what is left",
    )
    elastic_resize_check_s: float = Field(
        default=60.0,
        ge=0.0,
        description="elastic runs: how often a healthy run checks for capacity to grow toward "
        "max (Ray's ScalingConfig.elastic_resize_monitor_interval_s); each growth is a restart",
    )
    use_gpu: bool | None = Field(default=None, description="None: use GPUs if the cluster has any")
    resources_per_worker: dict[str, float] | None = Field(
        default=None, description="default {'CPU': 1} (plus {'GPU': 1} on GPU)"
    )
    threads_per_worker: int | None = Field(
        default=None, ge=1, description="torch intra-op threads; default: the worker's CPUs"
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="Ray placement of the workers (ScalingConfig.placement_strategy): PACK "
        "fills a node first; SPREAD spreads over nodes; STRICT_* insist",
    )
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection(name="cosine", warmup_epochs=2, min_lr_ratio=0.1)
    grad_clip_norm: float | None = Field(default=1000.0, gt=0.0, description="None: no clipping")
    on_nonfinite: Literal["raise", "skip"] = Field(
        default="raise",
        description="a step whose loss or gradient norm is NaN/inf: stop the run with an error "
        "naming the epoch, step and terms (raise), or drop the step's update (skip)",
    )
    max_nonfinite_steps: int = Field(
        default=10, ge=1, description="skip: steps the whole run may drop before it stops"
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    max_batches_per_epoch: int | None = Field(default=None, ge=1, description="cap, for smoke runs")
    checkpoint: CheckpointSection = CheckpointSection()
    max_failures: int = Field(default=2, ge=0, description="worker-group restarts before failing")
    max_preemption_failures: int = Field(
        default=-1,
        ge=-1,
        description="restarts after a node was preempted (drained with a deadline, then lost), "
        "counted apart from max_failures (Ray's FailureConfig.max_preemption_failures); "
        "-1: no limit",
    )
    controller_poll_s: float = Field(
        default=0.25,
        gt=0.0,
        description="how often Ray Train's controller polls the workers (Ray's "
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default; that variable wins when set): a "
        "worker's report waits for the poll that takes its previous one, so with short epochs "
        "a slow poll idles every worker for most of it at each checkpoint",
    )
    storage_path: str = Field(
        default_factory=lambda: os.environ.get(STORAGE_PATH_ENV) or "outputs/ray_results",
        validate_default=True,
        description="run storage every node reaches: a shared local path, or a URI such as "
        "s3://bucket/prefix, gs://bucket/prefix or file:///abs/dir (pyarrow file systems); "
        f"default ${STORAGE_PATH_ENV} when set, else outputs/ray_results",
    )
    run_name: str | None = Field(default=None, description="Ray run name prefix; default: `name`")
    ray_address: str | None = Field(
        default=None, description="Ray cluster; None: RAY_ADDRESS, else a local Ray"
    )
    local_num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="logical CPUs of a local Ray; default leaves room for Ray Data",
    )

    @field_validator("storage_path", mode="before")
    @classmethod
    def _resolve_storage(cls, v: object) -> str:
        if not isinstance(v, str | os.PathLike):
            raise ValueError(f"expected a path or URI string, got {type(v).__name__}")
        return locations.normalize(v)

    @field_validator("run_name")
    @classmethod
    def _safe_run_name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "train.run_name")

    @field_validator("resources_per_worker")
    @classmethod
    def _positive_resources(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for name, amount in (v or {}).items():
            if amount < 0:
                raise ValueError(f"resource {name!r}: amount must be >= 0, got {amount}")
        return v

    @field_validator("num_workers")
    @classmethod
    def _worker_range(cls, v: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (v, v) if isinstance(v, int) else v
        if low < 1:
            raise ValueError(f"needs at least 1 worker, got {low}")
        if low > high:
            raise ValueError(f"[min, max] must have min <= max, got [{low}, {high}]")
        return v

    @property
    def min_workers(self) -> int:
        """The fewest workers the run trains with (``num_workers``, or its min)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        """The most workers the run trains with (``num_workers``, or its max)."""
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        """Whether the worker count may change during the run."""
        return self.min_workers != self.max_workers

    @model_validator(mode="after")
    def _batch_covers_workers(self) -> TrainSection:
        if self.batch_size < self.max_workers:
            raise ValueError(
                f"train.batch_size ({self.batch_size}) is smaller than train.num_workers "
                f"({self.max_workers}{' at most' if self.elastic else ''}): each worker needs "
                "at least one row per step"
            )
        return self


class ExperimentConfig(Section):
    """Everything one training run needs, in one validated object."""

    name: str = "mvtcae-demo"
    data: DataSection = Field(default_factory=DataSection)  # reads $MVTCAE_DATA_DIR when built
    model: ModelSection = ModelSection()
    train: TrainSection = Field(default_factory=TrainSection)  # reads $MVTCAE_STORAGE_PATH
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    eval: EvaluationSection = Field(default_factory=EvaluationSection)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        return check_name(v, "name")

    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-safe dict of the whole config."""
        return self.model_dump(mode="json")

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The config as YAML text, also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text


def config_from_dict(raw: dict[str, Any], source: str = "dict") -> ExperimentConfig:
    """Validate a raw dict into an ExperimentConfig, raising ConfigError naming each bad field."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> ExperimentConfig:
    """Load a YAML config (or the embedded defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    source = "embedded defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path, "config file")
    apply_overrides(raw, list(overrides or []))
    return config_from_dict(raw, source)
