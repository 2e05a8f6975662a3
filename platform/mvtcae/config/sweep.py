"""The sweep config: a base experiment config plus the ``tune:`` section of a tune YAML.

The ``tune:`` section (`SweepSection`) says what to search (dotted experiment fields and their
distributions), what to optimise (validation measures that α and β do not change:
``val/joint_nll``, ``val/coherence_<k>``, ``val/latent_acc_<k>``), the budget, ASHA, and where
the Optuna study lives. `load_sweep_config` validates the whole file, the search space's edges
against the base experiment, and ASHA against the epochs; `mvtcae.sweep` runs it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
from mvtcae.config.experiment import ExperimentConfig, config_from_dict, load_config
from mvtcae.safety.names import check_name

SWEEP_STATE_FILE = "mvtcae_sweep.json"
OBJECTIVE_PATTERN = re.compile(r"^val/(joint_nll(_\d+)?|coherence_\d+|latent_acc_\d+)$")
LOSS_LIKE = re.compile(r"(^|/)(loss|joint_divergence|kld_.*|recon_.*)$")


class ParamSpec(Section):
    """One searched hyperparameter: a distribution over a dotted experiment-config field."""

    type: Literal["uniform", "loguniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: int | None = Field(default=None, ge=1, description="int only")
    log: bool = Field(default=False, description="int only: sample on a log scale")
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _bounds(self) -> ParamSpec:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty `choices` list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs `low` and `high`")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be smaller than high ({self.high})")
        if (self.type == "loguniform" or self.log) and self.low <= 0:
            raise ValueError(f"a log scale needs low > 0, got {self.low}")
        return self

    def extremes(self) -> list[Any]:
        """The values at the edges of the distribution (for validating against the base config)."""
        if self.type == "categorical":
            return list(self.choices or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]  # type: ignore[arg-type]
        return [self.low, self.high]

    def to_optuna(self) -> Any:
        """The Optuna distribution."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        if self.type == "categorical":
            return CategoricalDistribution(self.choices)
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=self.step or 1)
        return FloatDistribution(self.low, self.high, log=self.type == "loguniform")


class Objective(Section):
    """A measure to optimise, reported on the validation split after every epoch."""

    metric: str = "val/joint_nll"
    mode: Literal["min", "max"] = "min"

    @field_validator("metric")
    @classmethod
    def _weight_independent(cls, v: str) -> str:
        if LOSS_LIKE.search(v):
            raise ValueError(
                f"{v!r} is a term of the training loss, whose value α and β change, so it is not "
                "comparable across trials: use val/joint_nll, val/coherence_<k> or val/latent_acc_<k>"
            )
        if not OBJECTIVE_PATTERN.match(v):
            raise ValueError(
                f"unknown objective {v!r}: use val/joint_nll, val/joint_nll_<k>, "
                "val/coherence_<k> or val/latent_acc_<k>"
            )
        return v


class AshaSection(Section):
    """ASHA early stopping on epochs (Tune's training iterations)."""

    enabled: bool = True
    grace_period: int = Field(default=1, ge=1, description="epochs every trial runs")
    reduction_factor: float = Field(default=2.0, gt=1.0)
    brackets: int = Field(default=1, ge=1)


def _default_space() -> dict[str, ParamSpec]:
    return {
        "model.alpha": ParamSpec(type="uniform", low=0.0, high=1.0),
        "model.beta": ParamSpec(type="loguniform", low=0.1, high=10.0),
    }


class SweepSection(Section):
    """The ``tune:`` section: what to search, what to optimise, and the budget."""

    study_name: str | None = Field(
        default=None,
        description="Optuna study and Tune experiment name; default <experiment name>-sweep",
    )
    storage: str = Field(
        default="sqlite:///outputs/optuna.db",
        description="Optuna RDB storage (any SQLAlchemy URL); relative SQLite paths use the cwd",
    )
    space: dict[str, ParamSpec] = Field(default_factory=_default_space)
    objectives: list[Objective] = Field(default_factory=lambda: [Objective()], min_length=1)
    num_samples: int = Field(default=8, ge=1, description="trials in the whole sweep")
    max_concurrent: int = Field(default=2, ge=1)
    seed: int = 0
    sampler: Literal["tpe", "random"] = "tpe"
    tpe_startup_trials: int = Field(
        default=10, ge=1, description="random trials before TPE models the results"
    )
    asha: AshaSection = AshaSection()
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="trials to run first, e.g. the paper's α and β"
    )
    val_max_samples: int = Field(
        default=500, ge=1, description="validation rows evaluated after every epoch"
    )
    final_eval: bool = Field(
        default=True, description="evaluate each finished trial on the test split (eval section)"
    )
    register_best: bool = Field(default=True, description="best trial through the promotion gate")
    trial_cpus: float = Field(default=0.01, gt=0.0, description="CPUs of the Tune driver function")
    trials_in_process: bool | None = Field(
        default=None,
        description="train each trial in the trial's own process (Ray Train's local mode), which "
        "then holds the worker's CPUs and GPU, instead of starting a worker group per trial; "
        "None: when train.num_workers is 1 and not searched",
    )
    resume: bool = False
    infra_retries: int = Field(
        default=2, ge=0, description="retries of a trial's fit after an infrastructure failure"
    )
    max_infra_replacements: int = Field(
        default=2,
        ge=0,
        description="trials that failed for infrastructure reasons may be run again this many "
        "times in all, without counting against num_samples",
    )

    @field_validator("study_name")
    @classmethod
    def _safe_study_name(cls, v: str | None) -> str | None:
        return None if v is None else check_name(v, "tune.study_name")

    @field_validator("space")
    @classmethod
    def _non_empty(cls, v: dict[str, ParamSpec]) -> dict[str, ParamSpec]:
        if not v:
            raise ValueError("the search space is empty")
        return v

    @field_validator("storage")
    @classmethod
    def _absolute_sqlite(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError(f"{v!r} is not a SQLAlchemy URL, e.g. sqlite:///outputs/optuna.db")
        if v.startswith("sqlite:///") and not v.startswith("sqlite:////"):
            return f"sqlite:///{Path(v.removeprefix('sqlite:///')).resolve()}"
        return v

    @model_validator(mode="after")
    def _known_points(self) -> SweepSection:
        for i, point in enumerate(self.points_to_evaluate):
            unknown = sorted(set(point) - set(self.space))
            if unknown:
                raise ValueError(
                    f"points_to_evaluate[{i}] names {unknown}, not in the search space"
                )
        return self

    @property
    def metrics(self) -> list[str]:
        """Objective metric names, in order."""
        return [o.metric for o in self.objectives]

    @property
    def modes(self) -> list[str]:
        """Objective modes, in order."""
        return [o.mode for o in self.objectives]

    @property
    def multi_objective(self) -> bool:
        """Whether the study has more than one objective (a Pareto front)."""
        return len(self.objectives) > 1


class SweepFile(Section):
    """A tune YAML: the base experiment config, overrides to it, and the ``tune:`` section."""

    base: Path | None = Field(default=None, description="experiment YAML, relative to this file")
    base_overrides: list[str] = Field(default_factory=list, description="section.field=value")
    tune: SweepSection = Field(default_factory=SweepSection)


@dataclass
class SweepSpec:
    """A validated sweep: the base experiment config and the tune section."""

    experiment: ExperimentConfig
    tune: SweepSection
    source: Path | None = None

    @property
    def study_name(self) -> str:
        """The Optuna study name, which is also the Tune experiment's name."""
        return self.tune.study_name or f"{self.experiment.name}-sweep"

    @property
    def experiment_dir(self) -> str:
        """Where Tune keeps the sweep's state (restored by ``--resume``): a storage location."""
        return locations.join(self.experiment.train.storage_path, self.study_name)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: the full experiment config and the tune section."""
        return {"experiment": self.experiment.to_dict(), "tune": self.tune.model_dump(mode="json")}


def _split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    tune_items = [o.removeprefix("tune.") for o in overrides if o.startswith("tune.")]
    base_items = [o for o in overrides if not o.startswith("tune.")]
    return tune_items, base_items


def load_sweep_config(
    path: str | Path | None = None, overrides: list[str] | None = None
) -> SweepSpec:
    """Load a tune YAML; ``tune.x=v`` overrides go to the tune section, others to the base."""
    source = Path(path).resolve() if path is not None else None
    raw = read_yaml_mapping(source, "tune config") if source is not None else {}
    tune_items, base_items = _split_overrides(list(overrides or []))
    raw.setdefault("tune", {})
    if not isinstance(raw["tune"], dict):
        raise ConfigError(f"tune config {source}: `tune` must be a mapping")
    apply_overrides(raw["tune"], tune_items)
    try:
        tune_file = SweepFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, f"tune config {source or 'defaults'}")) from None
    experiment = _load_base(tune_file, source, base_items)
    spec = SweepSpec(experiment=experiment, tune=tune_file.tune, source=source)
    check_space_against_base(spec)
    check_budget(spec)
    check_in_process(spec)
    check_epoch_checkpoints(spec)
    return spec


def _load_base(tune_file: SweepFile, source: Path | None, overrides: list[str]) -> ExperimentConfig:
    base = tune_file.base
    if base is not None and not base.is_absolute() and source is not None:
        base = source.parent / base
    return load_config(base, [*tune_file.base_overrides, *overrides])


def trial_config(
    base: dict[str, Any], params: dict[str, Any], source: str = "trial"
) -> ExperimentConfig:
    """The base experiment config with a trial's sampled values set (validated)."""
    raw = json.loads(json.dumps(base))
    apply_overrides(raw, [f"{key}={json.dumps(value)}" for key, value in params.items()])
    return config_from_dict(raw, source)


def check_space_against_base(spec: SweepSpec) -> None:
    """Raise ConfigError naming the parameter when a search-space edge is not a valid config."""
    base = spec.experiment.to_dict()
    for name, param in spec.tune.space.items():
        for value in param.extremes():
            try:
                trial_config(base, {name: value}, source=f"tune.space[{name!r}] = {value!r}")
            except ConfigError as err:
                raise ConfigError(str(err)) from None


def check_budget(spec: SweepSpec) -> None:
    """Raise ConfigError when ASHA's grace period exceeds the training's epochs."""
    asha, epochs = spec.tune.asha, spec.experiment.train.epochs
    if asha.enabled and asha.grace_period > epochs:
        raise ConfigError(
            f"tune.asha.grace_period ({asha.grace_period}) exceeds train.epochs ({epochs})"
        )


def in_process_possible(spec: SweepSpec) -> bool:
    """Whether every trial trains one worker (what training in the trial's process needs)."""
    return spec.experiment.train.max_workers == 1 and "train.num_workers" not in spec.tune.space


def trials_in_process(spec: SweepSpec) -> bool:
    """``tune.trials_in_process``, the automatic choice decided."""
    chosen = spec.tune.trials_in_process
    return in_process_possible(spec) if chosen is None else chosen


def check_in_process(spec: SweepSpec) -> None:
    """Raise ConfigError when trials are to train in process but do not all train one worker."""
    if spec.tune.trials_in_process and not in_process_possible(spec):
        raise ConfigError(
            "tune.trials_in_process: true needs train.num_workers 1 (it is "
            f"{spec.experiment.train.num_workers}) and no train.num_workers in tune.space"
        )


def check_epoch_checkpoints(spec: SweepSpec) -> None:
    """Raise ConfigError when a sweep's trials are asked for checkpoints inside epochs: every
    report of a trial is a result of the sweep (a Tune iteration with the objectives), so its
    trials checkpoint at epoch ends only."""
    checkpoint = spec.experiment.train.checkpoint
    asked = [
        f"train.checkpoint.{name}"
        for name in ("every_steps", "every_minutes")
        if getattr(checkpoint, name) is not None
    ]
    if asked:
        raise ConfigError(
            f"{' and '.join(asked)}: sweep trials checkpoint at the end of each epoch only "
            "(each report of a trial is a sweep result); drop it from the sweep's base config"
        )


def trial_eval_config(spec: SweepSpec) -> EvaluationSection:
    """The per-epoch validation settings: only the measures the objectives need, no plots."""
    metrics = spec.tune.metrics
    needs = {
        "joint_nll": any(m.startswith("val/joint_nll") for m in metrics),
        "coherence": any(m.startswith("val/coherence_") for m in metrics),
        "latent_accuracy": any(m.startswith("val/latent_acc_") for m in metrics),
    }
    subset_nll = any(re.match(r"^val/joint_nll_\d+$", m) for m in metrics)
    return spec.experiment.eval.model_copy(
        update={
            **needs,
            "plots": False,
            "max_samples": spec.tune.val_max_samples,
            "nll_subsets_per_size": (spec.experiment.eval.nll_subsets_per_size or 1)
            if subset_nll
            else 0,
        }
    )
