"""The training driver: one run of MVTCAE on Ray Train, from dataset to registered model.

``train`` prepares the dataset, connects to Ray, opens (or, on resume, reopens) one MLflow run,
fits a ``TorchTrainer`` whose workers run `mvtcae.training.loop`, evaluates the best intact
checkpoint with `mvtcae.evaluation` (in a Ray task, on a GPU when training had one; in the
driver when the cluster is the local Ray it started), and hands it to the registry's promotion
gate. Any failure after the MLflow run is opened ends it FAILED; an interrupt (SIGINT, SIGTERM) stops
the run's workers and ends it KILLED.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

import mvtcae.data as data_layer
from mvtcae import storage, tracking
from mvtcae.config import EvaluationSection, ExperimentConfig, TrainSection
from mvtcae.data import open_splits
from mvtcae.data.files import DatasetError, dataset_files
from mvtcae.data.held import put_splits
from mvtcae.data.ray_input import should_materialize
from mvtcae.evaluation import evaluate_checkpoint
from mvtcae.model.errors import Interrupted, UserError
from mvtcae.safety.values import is_number
from mvtcae.storage import ray_session, runs
from mvtcae.storage.checkpoints import CHECKSUMS, MODEL_FILES, rank_by_metric, verify_checkpoint
from mvtcae.tracking import lineage
from mvtcae.tracking.run_logger import SPOOL_DIR, flush_spools, retry_until
from mvtcae.training.loop import (
    clear_stop_record,
    raise_for_stop,
    read_stop_record,
    train_loop_per_worker,
)
from mvtcae.training.phases import PhaseTimes, timed
from mvtcae.training.step import model_config_for

logger = logging.getLogger(__name__)
CONTROLLER_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Ray Train's environment setting of its controller's poll interval (seconds)."""
_POLL_FROM_ENVIRONMENT = os.environ.get(CONTROLLER_POLL_ENV)  # a user's own, read at import

RUN_STATE_FILE = runs.RUN_STATE_FILE
EVAL_HOST_TAG = "mvtcae.eval.host"
"""MLflow tag: where the run's final evaluation ran ("driver" or "ray task")."""


@dataclass(frozen=True)
class EpochObjectives:
    """A sweep's objectives, measured by rank 0 on ``split`` after every epoch."""

    names: tuple[str, ...]
    measures: EvaluationSection
    split: str


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str | None
    run_name: str
    run_dir: str
    best_checkpoint: str | None
    final_metrics: dict[str, float]
    best_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    registered: Any = None
    tracking_uri: str | None = None
    wall_time_s: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)
    """Wall seconds of the driver's phases (also logged to the run as ``time/<phase>_s``)."""
    candidates: list[str] = field(default_factory=list)
    trend_plot: str | None = None


BUILT_IN_NAMES = {"mfeat": "mfeat", "polymnist": "polymnist-recreation"}
"""The manifest name of each built-in dataset (``data.dataset``)."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """``data.dir`` holds no dataset, and none is to be prepared there."""


def prepare_dataset(cfg: ExperimentConfig) -> tuple[str, Any]:
    """Return the dataset location and manifest, writing a built-in dataset there if it is
    missing and may be prepared there (`DataSection.may_prepare`)."""
    data = cfg.data
    directory = data.resolved_dir()
    if data_layer.DatasetFiles(directory).is_file(data_layer.MANIFEST_FILE):
        manifest = data_layer.load_manifest(directory)
        _check_dataset_kind(cfg, directory, manifest)
        return directory, manifest
    if not data.may_prepare():
        raise DatasetNotFoundError(_no_dataset_message(cfg, directory))
    logger.info("preparing %s into %s", data.dataset, directory)
    if data.dataset == "polymnist":
        manifest = data_layer.prepare_polymnist(
            directory, n_train=data.n_train, n_test=data.n_test,
            missing_ratio=data.missing_ratio, seed=data.seed, progress=True,
        )  # fmt: skip
    else:
        manifest = data_layer.prepare_mfeat(
            directory, missing_ratio=data.missing_ratio, seed=data.seed, progress=True
        )
    return directory, manifest


def _no_dataset_message(cfg: ExperimentConfig, directory: str) -> str:
    data = cfg.data
    where = f"data.dir {directory} holds no dataset (no {data_layer.MANIFEST_FILE})"
    if data.dataset == "custom":
        return (
            f"{where}; write one there with `mvtcae data prepare arrays ARRAYS.npz {directory}` "
            "(docs/data-format.md, 'Bringing your own data'), or point data.dir at one"
        )
    return (
        f"{where}. The built-in {data.dataset} is prepared on its own only at its default "
        f"location {data.default_dir()}; if {directory} is the directory you meant, write it "
        f"there with `mvtcae data prepare {data.dataset} {directory}` or set "
        "data.prepare_if_missing: true"
    )


def _check_dataset_kind(cfg: ExperimentConfig, directory: str, manifest: Any) -> None:
    """Refuse a built-in ``data.dataset`` over a directory that holds another dataset: the
    run's parameters would name a dataset it did not train on."""
    expected = BUILT_IN_NAMES.get(cfg.data.dataset)
    if expected is not None and manifest.name != expected:
        raise DatasetError(
            f"data.dir {directory} holds the dataset {manifest.name!r} ({data_layer.MANIFEST_FILE}), "
            f"but data.dataset is {cfg.data.dataset!r}: set data.dataset: custom to train on "
            f"it, or point data.dir at a {cfg.data.dataset} dataset"
        )


def _worker_resources(cfg: TrainSection, use_gpu: bool) -> dict[str, float]:
    resources = dict(cfg.resources_per_worker or {"CPU": 1.0})
    if use_gpu:
        resources.setdefault("GPU", 1.0)
    return resources


def ensure_ray(cfg: TrainSection) -> None:
    """Refuse a run this machine cannot hold (`check_capacity`), then connect to the configured
    Ray cluster, or start a local one sized to the machine."""
    check_capacity(cfg)
    ray_session.ensure_ray(cfg.ray_address, cfg.local_num_cpus or ray_session.local_cpus())
    check_capacity(cfg)  # a cluster it connected to: a warning when it is short now


def requested_resources(cfg: TrainSection) -> tuple[dict[str, float], dict[str, str]]:
    """The CPUs and GPUs one run of ``cfg`` holds, and the settings that ask for each."""
    gpus_asked = cfg.use_gpu is True or (cfg.use_gpu is None and ray_session.machine_gpus() > 0)
    per_worker = _worker_resources(cfg, gpus_asked)
    asked, what = {}, {}
    for name in ("CPU", "GPU"):
        if per_worker.get(name):
            asked[name] = cfg.num_workers * per_worker[name]
            what[name] = (
                f"train.num_workers {cfg.num_workers} x train.resources_per_worker.{name} "
                f"{per_worker[name]:g}" + (" (train.use_gpu)" if name == "GPU" else "")
            )
    return asked, what


def check_capacity(cfg: TrainSection) -> None:
    """Refuse, before any worker starts, a run that cannot fit on this machine's local Ray (see
    `ray_session.check_capacity`)."""
    asked, what = requested_resources(cfg)
    ray_session.check_capacity(asked, what, cfg.ray_address, cfg.local_num_cpus)


def ensure_cluster(cfg: ExperimentConfig, dataset_dir: str) -> None:
    """`ensure_ray`, then refuse local dataset and storage paths that are node-local on a
    multi-node cluster (before any run is opened or any worker started)."""
    ensure_ray(cfg.train)
    ray_session.check_shared_paths(
        {"data.dir": storage.join(dataset_dir, data_layer.MANIFEST_FILE)},
        {"train.storage_path": cfg.train.storage_path},
    )


def scaling_config(cfg: TrainSection) -> ScalingConfig:
    """ScalingConfig from the config; GPUs are used when asked, or when there are any (auto)."""
    use_gpu = cfg.use_gpu
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    return ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=_worker_resources(cfg, use_gpu),
        placement_strategy=cfg.placement_strategy,
    )


def _threads_per_worker(cfg: TrainSection) -> int:
    if cfg.threads_per_worker:
        return cfg.threads_per_worker
    return max(1, int(round(_worker_resources(cfg, False).get("CPU", 1.0))))


def val_split_name(cfg: ExperimentConfig, manifest: Any) -> str:
    """The split validated every epoch: data.val_split, else 'val' if present, else 'test'."""
    return cfg.data.val_split or ("val" if "val" in manifest.splits else "test")


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


def _training_input(cfg: ExperimentConfig, dataset_dir: str, manifest: Any, plan: InputPlan,
                    phases: PhaseTimes | None = None) -> dict[str, Any]:  # fmt: skip
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
            files, materialize=plan.materialize, seed=cfg.train.seed, validate=False,
            reshuffle_each_epoch=cfg.data.reshuffle_shards_each_epoch, splits=["train", val_name],
        )  # fmt: skip
    return {"train": splits["train"], "val": splits[val_name]}


def check_splits(cfg: ExperimentConfig, dataset_dir: str, manifest: Any) -> None:
    """Refuse a dataset without the splits training reads: 'train' and the validation split."""
    val_name = val_split_name(cfg, manifest)
    if "train" not in manifest.splits or val_name not in manifest.splits:
        raise DatasetError(
            f"dataset {dataset_dir} has splits {sorted(manifest.splits)}; training needs "
            f"'train' and '{val_name}' (data.val_split; `mvtcae data prepare arrays "
            "--test-fraction` splits one off)"
        )


def _data_config() -> DataConfig:
    """Split train and val across workers, in a deterministic block order: with the per-epoch
    shuffle seeds, an epoch's row order is then a function of (seed, rank, epoch)."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=["train", "val"], execution_options=options)


def _set_controller_poll(seconds: float) -> None:
    """Ray Train's controller poll interval, unless the user's environment sets it: Ray reads it
    from the driver's environment and passes it to the controller it starts in ``fit``."""
    if _POLL_FROM_ENVIRONMENT is None:
        os.environ[CONTROLLER_POLL_ENV] = str(seconds)


@dataclass(frozen=True)
class LoopPlan:
    """What the worker loop of a run is given: its config, and the Ray Datasets it reads
    (None when the splits are held, their references then in the config)."""

    loop_cfg: dict[str, Any]
    datasets: dict[str, Any] | None


def plan_loop(cfg: ExperimentConfig, run_name: str, dataset_dir: str, manifest: Any,
              run_id: str | None, tracking_uri: str | None,
              objectives: EpochObjectives | None = None,
              phases: PhaseTimes | None = None) -> LoopPlan:  # fmt: skip
    """The worker loop's config and input for this run (the input validated and opened).

    ``objectives`` makes rank 0 measure a sweep's objectives after every epoch and report them.
    """
    tc = cfg.train
    plan = input_plan(cfg, manifest)
    splits = _training_input(cfg, dataset_dir, manifest, plan, phases)
    loop_cfg = {
        "train": tc.model_dump(mode="json"),
        "model_config": model_config_for(cfg.model, manifest).to_dict(),
        "dataset_dir": str(dataset_dir),
        "shuffle_buffer": cfg.data.shuffle_buffer,
        # Object references travel with the loop config; the driver (or trial) that put them
        # keeps them alive for the whole fit, worker restarts included.
        "held_splits": splits if plan.held else None,
        "threads_per_worker": _threads_per_worker(tc),
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "tracking_grace_s": cfg.tracking.outage_grace_s,
        "system_metrics_interval_s": cfg.tracking.system_metrics_interval_s,
        "run_dir": storage.join(tc.storage_path, run_name),
        "images": {
            "every": cfg.eval.images_every_n_epochs,
            "samples": cfg.eval.grid_samples,
            "split": val_split_name(cfg, manifest),
        },
    }
    if objectives is not None:
        loop_cfg.update(
            epoch_eval=objectives.measures.model_dump(mode="json"),
            val_split=objectives.split,
            objectives=list(objectives.names),
        )
    return LoopPlan(loop_cfg=loop_cfg, datasets=None if plan.held else splits)


def build_trainer(cfg: ExperimentConfig, run_name: str, dataset_dir: str, manifest: Any,
                  run_id: str | None, tracking_uri: str | None,
                  callbacks: list[Any] | None = None,
                  objectives: EpochObjectives | None = None,
                  phases: PhaseTimes | None = None) -> ray.train.torch.TorchTrainer:  # fmt: skip
    """The TorchTrainer for this config (same name + storage path restores a run's state).

    ``callbacks`` are Ray Train callbacks for the run (e.g. Tune's reporting callback);
    ``objectives``: see `plan_loop`.
    """
    plan = plan_loop(cfg, run_name, dataset_dir, manifest, run_id, tracking_uri, objectives, phases)
    return trainer_for(cfg, run_name, plan, callbacks)


def trainer_for(cfg: ExperimentConfig, run_name: str, plan: LoopPlan,
                callbacks: list[Any] | None = None) -> ray.train.torch.TorchTrainer:  # fmt: skip
    """The TorchTrainer of a planned run (see `build_trainer`)."""
    tc = cfg.train
    _set_controller_poll(tc.controller_poll_s)
    run_config = RunConfig(
        name=run_name,
        storage_path=str(tc.storage_path),
        checkpoint_config=CheckpointConfig(
            num_to_keep=tc.checkpoint.num_to_keep,
            checkpoint_score_attribute=tc.checkpoint.metric,
            checkpoint_score_order=tc.checkpoint.mode,
        ),
        failure_config=FailureConfig(max_failures=tc.max_failures),
        callbacks=list(callbacks or []),
    )
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config=plan.loop_cfg,
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


def train(cfg: ExperimentConfig, *, resume: bool = False) -> TrainResult:
    """Train (or resume) a run, evaluate its best checkpoint and register it in MLflow.

    Once the MLflow run is open, any failure (storage, Ray, non-finite values, evaluation,
    registration, an interrupt) ends it as FAILED (KILLED for an interrupt) with the error
    recorded in its ``mvtcae.error`` tag, and is raised again.
    """
    started, phases = time.perf_counter(), PhaseTimes()
    with phases.phase("run_setup"):  # what can be refused in a second comes first
        check_capacity(cfg.train)
        found = _run_to_resume(cfg) if resume else None
    with phases.phase("dataset"):
        dataset_dir, manifest = prepare_dataset(cfg)
    with phases.phase("run_setup"):
        check_dataset(cfg, dataset_dir, manifest, found)
    with phases.phase("ray_start"):
        ensure_cluster(cfg, dataset_dir)
    with phases.phase("run_setup"):
        tracking_uri = tracking.resolve_tracking_uri(cfg.tracking)
        run_name = found.name if found else runs.new_run_name(runs.run_prefix(cfg))
        run_id = _open_mlflow_run(cfg, found, run_name, dataset_dir, manifest)
    try:
        with phases.phase("run_setup"):
            record = found or runs.create_run(cfg, run_name, run_id, manifest.digest(),
                                              dataset_dir)  # fmt: skip
        out = _fit(cfg, record, dataset_dir, manifest, tracking_uri, phases)
        if out.best_checkpoint is not None:
            _evaluate_and_register(cfg, out, dataset_dir, phases)
        out.wall_time_s = time.perf_counter() - started
        out.phases = dict(phases.seconds)
        timings = phases.as_metrics() | {"time/driver_total_s": out.wall_time_s}
        retry_until(lambda: tracking.log_metrics(timings, run_id=run_id, tracking=cfg.tracking),
                    "logging the phase times", cfg.tracking.outage_grace_s)  # fmt: skip
    except KeyboardInterrupt as err:
        # The workers stop first: nothing is logged to the run after it is marked KILLED.
        _stop_ray_for_interrupt()
        tracking.end_run_after_error(err)
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        raise Interrupted(signum, run=f"{run_name} (MLflow run {run_id})") from err
    except BaseException as err:
        tracking.end_run_after_error(err)
        raise
    tracking.end_run()
    return out


def _stop_ray_for_interrupt() -> None:
    """End the Train run of an interrupted driver: a local Ray it started is stopped whole, a
    cluster it connected to is left (which ends the run's actors, see `ray_session.shutdown`);
    a session the caller opened is the caller's to end."""
    if ray_session.connected_here():
        ray_session.shutdown()
    else:
        logger.warning(
            "interrupted: the Ray session is the caller's; its Train run stops when this "
            "process disconnects (ray.shutdown())"
        )


def check_dataset(cfg: ExperimentConfig, dataset_dir: str, manifest: Any,
                  resumed: runs.RunRecord | None = None) -> None:  # fmt: skip
    """Before any work: a resumed run continues on the dataset it started on, and the registered
    model name holds versions of this dataset only (`tracking.check_registry_dataset`); the
    dataset has the splits training reads and the modalities the model options name."""
    check_splits(cfg, dataset_dir, manifest)
    model_config_for(cfg.model, manifest)  # ConfigError naming the option and the modality
    digest = manifest.digest()
    if resumed is not None and resumed.dataset_digest not in (None, digest):
        raise DatasetError(
            f"--resume: run {resumed.name} trained on a dataset with digest "
            f"{resumed.dataset_digest[:12]} ({resumed.dataset_dir or 'data.dir unknown'}); "
            f"data.dir {dataset_dir} holds {manifest.name!r} with digest {digest[:12]}. Resume "
            "with the run's data.dir, or start a new run without --resume"
        )
    retry_until(
        lambda: tracking.check_registry_dataset(cfg.tracking, digest, manifest.name,
                                                source=lineage.source_uri(dataset_dir)),
        "checking the registered model's dataset", cfg.tracking.outage_grace_s,
    )  # fmt: skip


class NothingToResumeError(UserError, FileNotFoundError):
    """``--resume`` found no run of this config's name in its run storage."""


def _run_to_resume(cfg: ExperimentConfig) -> runs.RunRecord:
    found = runs.find_latest_run(cfg)
    if found is None:
        raise NothingToResumeError(
            f"--resume: no run named {runs.run_prefix(cfg)}-<stamp> in train.storage_path "
            f"{cfg.train.storage_path}; run without --resume to start one (the run name comes "
            "from `name`, or train.run_name)"
        )
    logger.info("resuming %s in MLflow run %s", found.name, found.mlflow_run_id)
    return found


def _open_mlflow_run(cfg: ExperimentConfig, found: runs.RunRecord | None, run_name: str,
                     dataset_dir: str, manifest: Any) -> str:  # fmt: skip
    """Reopen the resumed run's MLflow run, or start one (config and dataset logged); return
    its id."""
    grace = cfg.tracking.outage_grace_s
    if found is not None:
        retry_until(lambda: tracking.start_run(cfg.tracking, run_id=found.mlflow_run_id),
                    "reopening the MLflow run", grace)  # fmt: skip
        return found.mlflow_run_id
    run = retry_until(lambda: tracking.start_run(cfg.tracking, run_name=run_name),
                      "starting the MLflow run", grace)  # fmt: skip
    try:
        retry_until(lambda: tracking.log_config(cfg.to_dict(), run_id=run.info.run_id,
                                                tracking=cfg.tracking),
                    "logging the config", grace)  # fmt: skip
        client = tracking.client_for(cfg.tracking)
        retry_until(lambda: lineage.log_dataset(client, run.info.run_id, manifest, dataset_dir),
                    "logging the dataset", grace)  # fmt: skip
    except BaseException as err:
        tracking.end_run_after_error(err)
        raise
    return run.info.run_id


def _fit(cfg: ExperimentConfig, record: runs.RunRecord, dataset_dir: str, manifest: Any,
         tracking_uri: str, phases: PhaseTimes | None = None) -> TrainResult:  # fmt: skip
    """Run the trainer; raise NonFiniteError if the workers stopped on one."""
    trainer = build_trainer(cfg, record.name, dataset_dir, manifest, record.mlflow_run_id,
                            tracking_uri, phases=phases)  # fmt: skip
    clear_stop_record(record.location)
    with timed(phases, "trainer_fit"):
        result = fit_in_thread(trainer)
    unsent = flush_spools(storage.join(record.location, SPOOL_DIR), tracking_uri,
                          cfg.tracking.outage_grace_s)  # fmt: skip
    if unsent:
        logger.warning("%d metric values could not be sent to MLflow; they are kept in %s",
                       unsent, storage.join(record.location, SPOOL_DIR))  # fmt: skip
    raise_for_stop(read_stop_record(record.location))
    ranked = ranked_checkpoints(result, cfg.train, record.location)
    final = {k: float(v) for k, v in (result.metrics or {}).items() if is_number(v)}
    return TrainResult(
        run_id=record.mlflow_run_id, run_name=record.name, run_dir=record.location,
        best_checkpoint=ranked[0][0] if ranked else None, final_metrics=final,
        best_metrics=ranked[0][1] if ranked else {}, tracking_uri=tracking_uri,
        candidates=[loc for loc, _ in ranked],
    )  # fmt: skip


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
    per_worker = _worker_resources(cfg, False).get("CPU", 1.0)
    return max(1, min(int(cfg.num_workers * per_worker), largest_node))


def _evaluate_and_register(cfg: ExperimentConfig, out: TrainResult, dataset_dir: str,
                           phases: PhaseTimes | None = None) -> None:  # fmt: skip
    """Evaluate the best intact checkpoint, log, register: in this process when the cluster is
    the local Ray it started, else in a Ray task (on a GPU if training had one); the run's
    ``mvtcae.eval.host`` tag says which.

    The evaluation writes its report and plots to ``<run dir>/evaluation`` in run storage; the
    driver reads them back from there, so the task may run on any node.
    """
    eval_dir = storage.join(out.run_dir, "evaluation")
    task, cpus = evaluation_task(cfg.train)
    args = (out.candidates or [out.best_checkpoint], str(dataset_dir),
            cfg.eval.model_dump(mode="json"))  # fmt: skip
    here = ray_session.started_here()
    with timed(phases, "evaluation"):
        if here:
            # The cluster is this process's own local Ray and training has ended: evaluating
            # here, on the CPUs it freed, spares a task worker's start and imports (~3 s).
            done = evaluate_checkpoint(*args, out_location=eval_dir, threads=cpus)
        else:
            done = ray.get(task.remote(*args, out_location=eval_dir, threads=cpus))
    report, task_out_dir, chosen, skipped = done
    for note in skipped:
        logger.warning("skipped corrupt checkpoint %s", note)
    out.best_checkpoint = chosen
    out.eval_metrics = {k: float(v) for k, v in report.metrics.items()}
    step = int(out.final_metrics.get("epoch", 0))
    grace = cfg.tracking.outage_grace_s
    if "trend" in report.plots:
        relative = Path(report.plots["trend"]).relative_to(task_out_dir).as_posix()
        out.trend_plot = storage.join(eval_dir, relative)
    with timed(phases, "mlflow_evaluation"), storage.local_directory(eval_dir) as local_eval:
        report.plots = {
            k: local_eval / Path(p).relative_to(task_out_dir) for k, p in report.plots.items()
        }
        retry_until(lambda: tracking.log_evaluation(report, run_id=out.run_id,
                                                    tracking=cfg.tracking, step=step),
                    "logging the evaluation", grace)  # fmt: skip
        client = tracking.client_for(cfg.tracking)
        retry_until(lambda: client.set_tag(out.run_id, EVAL_HOST_TAG,
                                           "driver" if here else "ray task"),
                    "tagging the evaluation", grace)  # fmt: skip
    if cfg.tracking.log_model:
        with (
            timed(phases, "registration"),
            storage.local_directory(chosen, files=(*MODEL_FILES, CHECKSUMS)) as checkpoint_dir,
        ):
            verify_checkpoint(checkpoint_dir, files=MODEL_FILES)
            out.registered = retry_until(
                lambda: tracking.log_model_and_register(
                    checkpoint_dir, cfg.tracking, out.eval_metrics, out.run_id
                ),
                f"registering the model (best checkpoint: {chosen})",
                grace,
            )
