"""Training MVTCAE on Ray Train: the step (`step`), the worker loop (`loop`) and where it runs
(`hosts`: a Ray Train worker group or the caller's process), the driver
(`driver`: ``train``) and its printed summary (`summary`), with non-finite guards (`nonfinite`).
"""

from mvtcae.training.driver import (
    RUN_STATE_FILE,
    EpochObjectives,
    LoopPlan,
    TrainResult,
    build_trainer,
    check_capacity,
    check_dataset,
    ensure_cluster,
    ensure_ray,
    evaluation_cpus,
    evaluation_task,
    plan_loop,
    prepare_dataset,
    ranked_checkpoints,
    scaling_config,
    train,
    trainer_for,
    val_split_name,
)
from mvtcae.training.loop import (
    InProcessResult,
    data_order_seed,
    raise_for_stop,
    read_stop_record,
    train_in_process,
)
from mvtcae.training.nonfinite import NonFiniteError, StepGuard
from mvtcae.training.step import (
    autocast,
    build_optimizer,
    build_scheduler,
    epoch_metrics,
    lr_factor,
    model_config_for,
    run_train_epoch,
    run_validation,
    train_step,
)
from mvtcae.training.summary import format_summary

__all__ = [
    "RUN_STATE_FILE",
    "EpochObjectives",
    "InProcessResult",
    "LoopPlan",
    "NonFiniteError",
    "StepGuard",
    "TrainResult",
    "autocast",
    "build_optimizer",
    "build_scheduler",
    "build_trainer",
    "check_capacity",
    "check_dataset",
    "data_order_seed",
    "ensure_cluster",
    "ensure_ray",
    "epoch_metrics",
    "evaluation_cpus",
    "evaluation_task",
    "format_summary",
    "lr_factor",
    "model_config_for",
    "plan_loop",
    "prepare_dataset",
    "raise_for_stop",
    "ranked_checkpoints",
    "read_stop_record",
    "run_train_epoch",
    "run_validation",
    "scaling_config",
    "train",
    "train_in_process",
    "train_step",
    "trainer_for",
    "val_split_name",
]
