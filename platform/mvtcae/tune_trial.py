"""One Tune trial: an MLflow child run around the platform's Ray Train training.

The trial function builds the training's ``TorchTrainer`` (`mvtcae.train.build_trainer`) with
a Train callback that, after every epoch, evaluates the epoch's checkpoint on the validation
split (the objective: a measure that α and β do not change) and forwards the merged metrics to
Tune, which hands them to ASHA and Optuna. A trial whose losses or objective are not finite
raises `TrialDiverged`, so Tune records it as errored and Optuna as failed.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from mvtcae import storage

RUN_ID_KEY = "mlflow_run_id"
TRIAL_TAG = "mvtcae.tune.trial_id"
SWEEP_TAG = "mvtcae.tune.sweep"
PARENT_TAG = "mlflow.parentRunId"


class TrialDiverged(RuntimeError):
    """A trial's loss or objective became NaN or infinite."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (passed with ``tune.with_parameters``)."""

    base_config: dict[str, Any]
    dataset_dir: str
    val_split: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    epoch_eval: dict[str, Any]
    objectives: tuple[str, ...]
    final_eval: bool


def to_val_names(metrics: dict[str, float]) -> dict[str, float]:
    """Rename an evaluation's ``eval/x`` metrics to ``val/x`` (they were measured on validation)."""
    return {"val/" + k.removeprefix("eval/"): float(v) for k, v in metrics.items()}


class EpochEvaluationCallback(TuneReportCallback):
    """Evaluate each epoch's checkpoint on the validation split, then report to Tune and MLflow."""

    def __init__(self, context: SweepContext, run_id: str) -> None:
        super().__init__()
        self.context = context
        self.run_id = run_id

    def after_report(
        self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any
    ) -> None:
        """Merge rank 0's metrics with the validation measures of the reported checkpoint."""
        merged = dict(metrics[0])
        merged[RUN_ID_KEY] = self.run_id
        if checkpoint is not None:
            root = self.context.base_config["train"]["storage_path"]
            merged["checkpoint_path"] = storage.location_of(root, checkpoint.path)
            measures = self._evaluate(checkpoint)
            merged.update(measures)
            self._log(measures, int(merged.get("epoch", 0)))
        self._training_actor_item_queue.put(merged)

    def _evaluate(self, checkpoint: Any) -> dict[str, float]:
        import torch

        from mvtcae.checkpoint import load_model
        from mvtcae.evaluate import EvalConfig, evaluate

        torch.set_num_threads(1)
        try:
            with checkpoint.as_directory() as checkpoint_dir:
                model = load_model(checkpoint_dir)
            cfg = EvalConfig.model_validate(self.context.epoch_eval)
            report = evaluate(model, self.context.dataset_dir, cfg, split=self.context.val_split)
            return to_val_names(report.metrics)
        except Exception as err:  # a diverged model breaks the probe/NLL: report, don't crash
            print(f"[mvtcae.tune] validation measures failed: {type(err).__name__}: {err}")
            return {name: math.nan for name in self.context.objectives}

    def _log(self, measures: dict[str, float], epoch: int) -> None:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        entries = [Metric(k, v, now, epoch) for k, v in measures.items() if math.isfinite(v)]
        if entries:
            MlflowClient(tracking_uri=self.context.tracking_uri).log_batch(
                self.run_id, metrics=entries
            )


def start_child_run(context: SweepContext, trial_id: str, params: dict[str, Any]) -> str:
    """Create the trial's MLflow run nested under the sweep's parent run; log its sampled values."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=context.tracking_uri)
    run = client.create_run(
        context.experiment_id,
        run_name=f"{context.sweep_name}-{trial_id}",
        tags={
            PARENT_TAG: context.parent_run_id,
            TRIAL_TAG: trial_id,
            SWEEP_TAG: context.sweep_name,
        },
    )
    client.log_dict(run.info.run_id, dict(params), "trial_params.json")
    return run.info.run_id


def check_finite(metrics: dict[str, Any], names: tuple[str, ...], where: str) -> None:
    """Raise TrialDiverged when one of the named metrics is missing a finite value."""
    for name in names:
        value = metrics.get(name)
        if isinstance(value, int | float) and not math.isfinite(value):
            raise TrialDiverged(f"{where}: {name} is {value}; the trial diverged")


def run_trial(params: dict[str, Any], context: SweepContext) -> None:
    """Tune function: train one configuration with Ray Train inside an MLflow child run."""
    import ray.tune
    from mlflow.tracking import MlflowClient

    from mvtcae import tracking
    from mvtcae.tune import trial_config

    trial_id = ray.tune.get_context().get_trial_id()
    run_id = start_child_run(context, trial_id, params)
    client = MlflowClient(tracking_uri=context.tracking_uri)
    try:
        cfg = trial_config(context.base_config, params, source=f"trial {trial_id} {params}")
        tracking.log_config(cfg.to_dict(), run_id=run_id, tracking=cfg.tracking)
        result = _fit(cfg, context, trial_id, run_id)
        check_finite(result.metrics or {}, ("train/loss", "val/loss"), f"trial {trial_id}")
        if context.final_eval and result.checkpoint is not None:
            _final_evaluation(cfg, context, result.checkpoint, run_id)
    except BaseException as err:
        client.set_tag(run_id, "mvtcae.tune.error", f"{type(err).__name__}: {err}"[:5000])
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def _fit(cfg: Any, context: SweepContext, trial_id: str, run_id: str) -> Any:
    from pathlib import Path

    from mvtcae.data import load_manifest
    from mvtcae.train import build_trainer

    manifest = load_manifest(context.dataset_dir)
    trainer = build_trainer(
        cfg, f"{context.sweep_name}-{trial_id}", Path(context.dataset_dir), manifest,
        run_id, context.tracking_uri, callbacks=[EpochEvaluationCallback(context, run_id)],
    )  # fmt: skip
    return trainer.fit()


def _final_evaluation(cfg: Any, context: SweepContext, checkpoint: Any, run_id: str) -> None:
    """Evaluate the trial's last checkpoint (a Ray ``Checkpoint``) on the test split and log it
    to the child run."""
    import torch

    from mvtcae import tracking
    from mvtcae.checkpoint import load_model, read_trainer_state
    from mvtcae.evaluate import evaluate

    torch.set_num_threads(1)
    eval_cfg = cfg.eval.model_copy(update={"plots": False})
    with checkpoint.as_directory() as checkpoint_dir:
        model = load_model(checkpoint_dir)
        step = read_trainer_state(checkpoint_dir).epoch
    report = evaluate(model, context.dataset_dir, eval_cfg, split="test")
    tracking.log_evaluation(report, run_id=run_id, tracking=cfg.tracking, step=step)
