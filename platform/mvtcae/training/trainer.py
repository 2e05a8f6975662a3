"""The Ray Train side of a run: the ``TorchTrainer`` of a planned fit (scaling, storage,
checkpoint retention, failure policy), its fit off the main thread, its ranked checkpoints, and
the Ray task that evaluates a checkpoint with the resources training freed.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mvtcae import storage
from mvtcae.config import ExperimentConfig, TrainSection
from mvtcae.evaluation import evaluate_checkpoint
from mvtcae.storage import ray_session
from mvtcae.storage.checkpoints import rank_by_metric
from mvtcae.training.loop import train_loop_per_worker
from mvtcae.training.phases import PhaseTimes
from mvtcae.training.plan import PLAN_KEY, EpochObjectives, FitPlan, plan_loop, worker_resources
from mvtcae.training.run_console import train_logging_config

CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's environment setting of its controller's poll interval (seconds)."""
WORKER_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Ray Train's environment setting of how long a worker group may take to start (seconds)."""

# A user's own settings, read at import: the config sets them only where the user did not.
_FROM_ENVIRONMENT = {
    name: os.environ.get(name) for name in (CONTROLLER_POLL_ENV, WORKER_START_TIMEOUT_ENV)
}


def scaling_config(cfg: TrainSection) -> ScalingConfig:
    """ScalingConfig from the config; GPUs are used when asked, or when there are any (auto)."""
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    return ScalingConfig(
        # (min, max): Ray Train's elastic policy starts with what fits of max (at least min)
        # and restarts the group from the newest checkpoint to grow or after losing workers.
        num_workers=cfg.num_workers,
        elastic_resize_monitor_interval_s=cfg.elastic_resize_check_s,
        use_gpu=use_gpu,
        resources_per_worker=worker_resources(cfg, use_gpu),
        placement_strategy=cfg.placement_strategy,
    )


def _data_config() -> DataConfig:
    """Split train and val across workers, in a deterministic block order: with the per-epoch
    shuffle seeds, an epoch's row order is then a function of (seed, rank, epoch)."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train", "val"], execution_options=options)


def _set_controller_settings(cfg: TrainSection) -> None:
    """Ray Train's controller poll interval and worker-group start timeout, unless the user's
    environment sets them: Ray reads them from the driver's environment and passes them to the
    controller it starts in ``fit``."""
    wanted = {
        CONTROLLER_POLL_ENV: cfg.controller_poll_s,
        WORKER_START_TIMEOUT_ENV: cfg.worker_start_timeout_s,
    }
    for name, seconds in wanted.items():
        if _FROM_ENVIRONMENT[name] is None:
            if seconds is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = str(seconds)


def build_trainer(
    cfg: ExperimentConfig,
    run_name: str,
    dataset_dir: str,
    manifest: Any,
    run_id: str | None,
    tracking_uri: str | None,
    callbacks: list[Any] | None = None,
    objectives: EpochObjectives | None = None,
    phases: PhaseTimes | None = None,
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer for this config (same name + storage path restores a run's state).

    ``callbacks`` are Ray Train callbacks for the run (e.g. Tune's reporting callback);
    ``objectives``: see `plan_loop`.
    """
    plan = plan_loop(cfg, run_name, dataset_dir, manifest, run_id, tracking_uri, objectives, phases)
    return trainer_for(cfg, run_name, plan, callbacks)


def trainer_for(
    cfg: ExperimentConfig, run_name: str, plan: FitPlan, callbacks: list[Any] | None = None
) -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of a planned run (see `build_trainer`)."""
    tc = cfg.train
    _set_controller_settings(tc)
    run_config = RunConfig(
        name=run_name,
        storage_path=str(tc.storage_path),
        checkpoint_config=CheckpointConfig(
            num_to_keep=tc.checkpoint.num_to_keep,
            checkpoint_score_attribute=tc.checkpoint.metric,
            checkpoint_score_order=tc.checkpoint.mode,
        ),
        failure_config=FailureConfig(
            max_failures=tc.max_failures,
            # A node drained with a deadline and then lost: its own budget, as Ray counts it.
            max_preemption_failures=tc.max_preemption_failures,
        ),
        callbacks=list(callbacks or []),
        logging_config=train_logging_config(),  # Ray Train's INFO lines: run log (console)
    )
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        # Ray Train V2 records train_loop_config in its run state as a dict (a pydantic
        # ``Optional[Dict]`` field whose values it makes JSON-readable): the typed plan travels
        # as the one value of a dict, pickled to the workers like any other.
        train_loop_config={PLAN_KEY: plan.loop},
        scaling_config=scaling_config(tc),
        run_config=run_config,
        datasets=plan.datasets,
        dataset_config=None if plan.datasets is None else _data_config(),
    )


def ranked_checkpoints(result: Any, cfg: TrainSection, run_dir: str) -> list[tuple[str, dict]]:
    """(storage location, metrics) of the run's kept checkpoints, best first by the checkpoint
    metric; checkpoints whose metric is missing or not finite come last."""
    entries = [(c.path, dict(m)) for c, m in (result.best_checkpoints or [])]
    ranked = rank_by_metric(entries, cfg.checkpoint.metric, cfg.checkpoint.mode)
    return [(storage.location_of(run_dir, path), metrics) for path, metrics in ranked]


def fit_in_thread(trainer: Any) -> Any:
    """``trainer.fit()``, with this thread free to take an interrupt.

    In the main thread, Ray Train's ``fit`` installs its own SIGINT handler, which ends the
    process with SystemExit after aborting the run: an interrupt then looks like a failure, and
    SIGTERM is not handled at all. Off the main thread it installs none, so Ctrl-C and SIGTERM
    arrive here as themselves, and the caller stops the run and records it KILLED.
    """
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="mvtcae-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def evaluation_task(cfg: TrainSection) -> tuple[Any, int]:
    """``evaluate_checkpoint`` as a Ray task for a run trained with ``cfg``, and its CPU count:
    the CPUs training freed (`evaluation_cpus`), and a GPU when training had one.

    The task is scheduled outside any enclosing placement group: inside a Tune trial, whose
    group holds only the trial's token CPU, it would otherwise never fit.
    """
    use_gpu = bool(scaling_config(cfg).use_gpu)
    cpus = evaluation_cpus(cfg, ray_session.largest_node_cpus(use_gpu))
    task = ray.remote(evaluate_checkpoint).options(
        num_cpus=cpus,
        num_gpus=1 if use_gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    )
    return task, cpus


def evaluation_cpus(cfg: TrainSection, largest_node: int) -> int:
    """CPUs for the final evaluation: those the training workers held, free once ``fit``
    returned (the likelihood estimate runs about twice as fast on 2 threads as on 1), but no
    more than the ``largest_node`` has (the workers may have been on several nodes)."""
    per_worker = worker_resources(cfg, False).get("CPU", 1.0)
    return max(1, min(int(cfg.max_workers * per_worker), largest_node))
