"""What is checked and prepared before a run opens: the dataset (prepared if it may be, of the
kind the config names, with the splits and modalities training reads), the resources the run asks
for, the Ray cluster it runs on, and on ``--resume`` the run it continues. Each refusal comes
before any MLflow run is opened or any worker started.
"""

from __future__ import annotations

import logging
from typing import Any

import mvtcae.data as data_layer
from mvtcae import storage, tracking
from mvtcae.config import ExperimentConfig, TrainSection
from mvtcae.data.files import DatasetError
from mvtcae.model.errors import UserError
from mvtcae.storage import ray_session, runs
from mvtcae.tracking import dataset_lineage as lineage
from mvtcae.tracking.run_logger import retry_until
from mvtcae.training.plan import check_splits, worker_resources
from mvtcae.training.step import model_config_for

logger = logging.getLogger(__name__)

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
            directory,
            n_train=data.n_train,
            n_test=data.n_test,
            missing_ratio=data.missing_ratio,
            seed=data.seed,
            progress=True,
        )
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


def check_dataset(
    cfg: ExperimentConfig, dataset_dir: str, manifest: Any, resumed: runs.RunRecord | None = None
) -> None:
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
        lambda: tracking.check_registry_dataset(
            cfg.tracking, digest, manifest.name, source=lineage.source_uri(dataset_dir)
        ),
        "checking the registered model's dataset",
        cfg.tracking.outage_grace_s,
    )


def requested_resources(cfg: TrainSection) -> tuple[dict[str, float], dict[str, str]]:
    """The CPUs and GPUs the fewest workers ``cfg`` trains with hold, and the settings that ask
    for each."""
    workers = cfg.min_workers
    setting = "train.num_workers " + (f"min {workers}" if cfg.elastic else str(workers))
    gpus_asked = cfg.use_gpu is True or (cfg.use_gpu is None and ray_session.machine_gpus() > 0)
    per_worker = worker_resources(cfg, gpus_asked)
    asked, what = {}, {}
    for name in ("CPU", "GPU"):
        if per_worker.get(name):
            asked[name] = workers * per_worker[name]
            what[name] = f"{setting} x train.resources_per_worker.{name} {per_worker[name]:g}" + (
                " (train.use_gpu)" if name == "GPU" else ""
            )
    return asked, what


def check_capacity(cfg: TrainSection) -> None:
    """Refuse, before any worker starts, a run that cannot fit on this machine's local Ray (see
    `ray_session.check_resources`): an elastic run needs its min to fit."""
    asked, what = requested_resources(cfg)
    ray_session.check_resources(asked, what, cfg.ray_address, cfg.local_num_cpus)


def connect_ray(cfg: TrainSection) -> None:
    """Refuse a run this machine cannot hold (`check_capacity`), then connect to the configured
    Ray cluster, or start a local one sized to the machine (`ray_session.ensure_ray`, which
    knows nothing of the training config)."""
    check_capacity(cfg)
    ray_session.ensure_ray(cfg.ray_address, cfg.local_num_cpus or ray_session.local_cpus())
    check_capacity(cfg)  # a cluster it connected to: a warning when it is short now


def ensure_cluster(cfg: ExperimentConfig, dataset_dir: str) -> None:
    """`connect_ray`, then refuse local dataset and storage paths that are node-local on a
    multi-node cluster (before any run is opened or any worker started)."""
    connect_ray(cfg.train)
    ray_session.check_shared_paths(
        {"data.dir": storage.join(dataset_dir, data_layer.MANIFEST_FILE)},
        {"train.storage_path": cfg.train.storage_path},
    )


class NothingToResumeError(UserError, FileNotFoundError):
    """``--resume`` found no run of this config's name in its run storage."""


def run_to_resume(cfg: ExperimentConfig) -> runs.RunRecord:
    """The newest run of this config's name in its run storage (``--resume``)."""
    found = runs.find_latest_run(cfg)
    if found is None:
        raise NothingToResumeError(
            f"--resume: no run named {runs.run_prefix(cfg)}-<stamp> in train.storage_path "
            f"{cfg.train.storage_path}; run without --resume to start one (the run name comes "
            "from `name`, or train.run_name)"
        )
    logger.info("resuming %s in MLflow run %s", found.name, found.mlflow_run_id)
    return found
