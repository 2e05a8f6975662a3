"""Training MVTCAE on Ray Train: the step (`step`), the worker loop (`loop`), its typed plan
(`plan`) and where it runs (`hosts`: a Ray Train worker group or the caller's process), the
checks before a run (`preflight`), the ``TorchTrainer`` (`trainer`), a run's life from its
MLflow run to its registered model (`lifecycle`: ``train``, and a sweep trial's steps) and the
printed summary (`run_summary`), with non-finite guards (`nonfinite`).

The names below are those other packages, the jobs and the tests use.
"""

from mvtcae.training.lifecycle import RUN_STATE_FILE, TrainResult, train
from mvtcae.training.loop import train_in_process
from mvtcae.training.plan import EpochObjectives, plan_loop, val_split_name
from mvtcae.training.preflight import check_capacity, check_dataset, ensure_cluster, prepare_dataset
from mvtcae.training.run_summary import format_summary
from mvtcae.training.step import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    model_config_for,
    run_train_epoch,
    run_validation,
    train_step,
)
from mvtcae.training.trainer import build_trainer, evaluation_cpus, scaling_config

__all__ = [
    "RUN_STATE_FILE",
    "EpochObjectives",
    "TrainResult",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "check_capacity",
    "check_dataset",
    "ensure_cluster",
    "evaluation_cpus",
    "format_summary",
    "lr_factor",
    "model_config_for",
    "plan_loop",
    "prepare_dataset",
    "run_train_epoch",
    "run_validation",
    "scaling_config",
    "train",
    "train_in_process",
    "train_step",
    "val_split_name",
]
