"""A run's console header and its log files: the driver's part of `mvtcae.storage.console`.

`run_log` keeps the driver's log lines in ``<run dir>/logs/driver.log`` while a run (or a sweep)
runs and, when it ends, uploads every file of ``<run dir>/logs`` (the driver's and each Train
worker's, ``rank<k>.log``) into the MLflow run's artifacts under ``logs/``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray.train

from mvtcae import storage, tracking
from mvtcae.config import ExperimentConfig, SweepSpec, TrackingSection
from mvtcae.safety.redaction import redact_text
from mvtcae.storage.console import LOG_DIR, RunLog, quiet_console, verbose
from mvtcae.tracking.run_logger import mlflow_client

logger = logging.getLogger(__name__)


def train_logging_config() -> ray.train.LoggingConfig:
    """Ray Train's console level for the controller and the workers of a run: its INFO lines
    (one per report, one per checkpoint, worker-group start) only when verbose; its own
    session log files keep every level, and the workers' run logs take INFO (`RunLog`)."""
    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def announce(what: str, run_dir: str, run_id: str | None, tracking_cfg: TrackingSection) -> None:
    """The header of a run: what runs where, its MLflow run, the dashboards and its log."""
    uri = redact_text(str(tracking.resolve_tracking_uri(tracking_cfg)))
    logger.info("%s", what)
    logger.info("MLflow run %s  (%s)%s", run_id, uri, _run_link(uri, run_id, tracking_cfg))
    logger.info(
        "log: %s  (Ray's and MLflow's INFO lines; on the console with --verbose)",
        storage.join(run_dir, LOG_DIR),
    )


def _run_link(uri: str, run_id: str | None, tracking_cfg: TrackingSection) -> str:
    if not run_id or not uri.startswith(("http://", "https://")):
        return ""
    try:
        experiment = tracking.ensure_experiment(tracking_cfg)
    except Exception:  # noqa: BLE001 - a header line must not stop the run
        return ""
    return f"  {uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


@contextmanager
def run_log(
    run_dir: str, run_id: str | None, tracking_cfg: TrackingSection, name: str = "driver"
) -> Iterator[RunLog]:
    """While inside: this process's log lines also go to ``<run_dir>/logs/<name>.log``; on the
    way out, ``<run_dir>/logs`` goes into the MLflow run ``run_id`` as ``logs/`` (best effort:
    a tracking outage costs the copy, never the run)."""
    quiet_console()
    log = RunLog(run_dir, name).attach()
    try:
        yield log
    finally:
        log.close()
        if run_id:
            _upload(run_dir, run_id, str(tracking.resolve_tracking_uri(tracking_cfg)))


@contextmanager
def logs_to_mlflow(run_dir: str, run_id: str, tracking_uri: str) -> Iterator[None]:
    """On the way out, ``<run_dir>/logs`` (its Train workers' logs) into the MLflow run
    ``run_id`` as ``logs/``, best effort: a sweep trial's run."""
    try:
        yield
    finally:
        _upload(run_dir, run_id, tracking_uri)


def _upload(run_dir: str, run_id: str, tracking_uri: str) -> None:
    location = storage.join(run_dir, LOG_DIR)
    try:
        if LOG_DIR not in storage.list_dirs(run_dir):
            return  # nothing written (the run never started its workers)
        with storage.local_directory(location) as local:
            mlflow_client(tracking_uri).log_artifacts(run_id, str(local), LOG_DIR)
    except Exception as err:  # noqa: BLE001 - the log stays in run storage
        logger.warning(
            "the run's log files stay in %s (not copied to MLflow: %s: %s)",
            storage.join(run_dir, LOG_DIR),
            type(err).__name__,
            err,
        )


def describe_workers(num_workers: int | tuple[int, int], resources: dict[str, Any]) -> str:
    """``2 workers x (CPU 1)`` (``1-4 workers x (CPU 1)`` when elastic) for a header."""
    per = ", ".join(f"{k} {v:g}" for k, v in resources.items())
    low, high = (num_workers, num_workers) if isinstance(num_workers, int) else num_workers
    count = str(high) if low == high else f"{low}-{high}"
    return f"{count} worker{'s' if high != 1 else ''} x ({per})"


@contextmanager
def run_console(cfg: ExperimentConfig, run_name: str, run_id: str | None) -> Iterator[RunLog]:
    """A training run's header, then `run_log` over its run directory."""
    tc = cfg.train
    where = tc.ray_address or "the local Ray"
    workers = describe_workers(tc.num_workers, dict(tc.resources_per_worker or {"CPU": 1.0}))
    run_dir = storage.join(tc.storage_path, run_name)
    with run_log(run_dir, run_id, cfg.tracking) as log:
        announce(
            f"training {run_name}: {tc.epochs} epochs, {workers} on {where}",
            run_dir,
            run_id,
            cfg.tracking,
        )
        yield log


@contextmanager
def sweep_console(spec: SweepSpec, parent_run_id: str | None) -> Iterator[RunLog]:
    """A sweep's header (how many trials it runs, and why Tune may count more), then `run_log`
    over the sweep's directory for its MLflow parent run. Each trial's Train workers keep
    their own logs in the trial's run directory (``train_runs/<run>/logs``)."""
    tc, tune = spec.experiment.train, spec.tune
    workers = describe_workers(tc.num_workers, dict(tc.resources_per_worker or {"CPU": 1.0}))
    spare = tune.max_infra_replacements
    extra = (
        f" (Tune counts {tune.num_samples + spare}: up to {spare} more replace trials that fail "
        "for infrastructure reasons)"
        if spare
        else ""
    )
    # Tune's newer output prints its configuration box whatever the verbosity; its classic
    # output at verbosity 0 prints nothing (Ray's documented RAY_AIR_NEW_OUTPUT switch).
    classic = not verbose() and "RAY_AIR_NEW_OUTPUT" not in os.environ
    if classic:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    with run_log(spec.experiment_dir, parent_run_id, spec.experiment.tracking) as log:
        announce(
            f"sweep {spec.study_name}: {tune.num_samples} trials{extra}, {tune.max_concurrent} "
            f"at a time, each {tc.epochs} epochs on {workers}",
            spec.experiment_dir,
            parent_run_id,
            spec.experiment.tracking,
        )
        try:
            yield log
        finally:
            if classic:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def tune_verbosity() -> int:
    """Tune's own console output: its status tables only when verbose."""
    return 1 if verbose() else 0
