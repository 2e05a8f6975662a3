"""Configuration: one validated pydantic section per concern, YAML in and out.

``ExperimentConfig`` (a training run: data, model, train, tracking and eval sections) and
``SweepSpec`` (a base experiment plus the ``tune:`` section) are what the CLI, the jobs and the
tests build; sections are small pydantic models that refuse unknown keys and name the field at
fault in a ``ConfigError``.
"""

from mvtcae.config.base import ConfigError, Section, apply_overrides, read_yaml_mapping
from mvtcae.config.evaluation import EvaluationSection
from mvtcae.config.experiment import (
    CheckpointSection,
    DataSection,
    ExperimentConfig,
    ModelSection,
    OptimizerSection,
    ScheduleSection,
    TrainSection,
    config_from_dict,
    load_config,
)
from mvtcae.config.sweep import (
    AshaSection,
    Objective,
    ParamSpec,
    SweepFile,
    SweepSection,
    SweepSpec,
    load_sweep_config,
    trial_config,
    trial_eval_config,
)
from mvtcae.config.tracking import TrackingSection

__all__ = [
    "AshaSection",
    "CheckpointSection",
    "ConfigError",
    "DataSection",
    "EvaluationSection",
    "ExperimentConfig",
    "ModelSection",
    "Objective",
    "OptimizerSection",
    "ParamSpec",
    "ScheduleSection",
    "Section",
    "SweepFile",
    "SweepSection",
    "SweepSpec",
    "TrackingSection",
    "TrainSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "load_sweep_config",
    "read_yaml_mapping",
    "trial_config",
    "trial_eval_config",
]
