"""MLflow runs: the tracking URI, one driver-owned run per training, config and metrics.

Nothing touches MLflow at import time (``mlflow`` is imported inside the functions). Credentials
written into a tracking URI move into MLflow's environment variables before MLflow sees the URI
(`mvtcae.tracking.run_logger.client_uri`), and configs are logged with them masked.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel

from mvtcae.config.tracking import TrackingSection
from mvtcae.safety.redaction import redact, redact_text
from mvtcae.tracking.auth import apply_credentials_file
from mvtcae.tracking.run_logger import client_uri, log_in_batches, mlflow_client

if TYPE_CHECKING:
    import mlflow
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000


# ----------------------------------------------------------------------------- URIs and runs


def resolve_tracking_uri(cfg: TrackingSection | None = None) -> str:
    """Tracking URI from the config, else ``MLFLOW_TRACKING_URI``, else a local SQLite store."""
    apply_credentials_file()  # credentials for a server with basic auth, from a private file
    uri = (cfg.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    allow_file = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
    looks_like_path = "://" not in uri and (uri[0] in "./~" or os.sep in uri)
    if (uri.startswith("file:") or looks_like_path) and not allow_file:
        raise ValueError(
            f"tracking URI {redact_text(uri)!r} is a file store, which this MLflow version refuses: use "
            "'sqlite:///<absolute path>/mlflow.db' or an 'http://host:port' MLflow server"
        )
    return uri


def resolve_artifact_location(cfg: TrackingSection, tracking_uri: str) -> str | None:
    """Artifact root for new experiments: the configured one, or ``mlartifacts`` beside SQLite."""
    if cfg.artifact_location:
        location = cfg.artifact_location
        return location if "://" in location else str(Path(location).resolve())
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db_path.is_absolute():
            db_path = Path.cwd() / db_path
        return str(db_path.resolve().parent / "mlartifacts")
    return None


def client_for(cfg: TrackingSection | None = None) -> MlflowClient:
    """An `MlflowClient` on the resolved tracking (and registry) URI."""
    return mlflow_client(resolve_tracking_uri(cfg))


def _use_uri(uri: str) -> None:
    """Point the fluent MLflow API at ``uri`` (credentials moved out of it, see client_uri)."""
    import mlflow

    public = client_uri(uri)
    mlflow.set_tracking_uri(public)
    mlflow.set_registry_uri(public)


def ensure_experiment(cfg: TrackingSection) -> str:
    """Return the id of the configured experiment, creating it (with its artifact root) if new."""
    from mlflow.exceptions import MlflowException

    client = client_for(cfg)
    existing = client.get_experiment_by_name(cfg.experiment_name)
    if existing is not None:
        return existing.experiment_id
    location = resolve_artifact_location(cfg, resolve_tracking_uri(cfg))
    try:
        return client.create_experiment(cfg.experiment_name, artifact_location=location)
    except MlflowException:
        # Another driver created it between the lookup and the create.
        existing = client.get_experiment_by_name(cfg.experiment_name)
        if existing is None:
            raise
        return existing.experiment_id


ERROR_TAG = "mvtcae.error"
"""What ended a run FAILED or KILLED (removed when the run is resumed)."""


def start_run(
    cfg: TrackingSection,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> mlflow.ActiveRun:
    """Point MLflow at the tracking URI and start (or resume, with ``run_id``) a run."""
    import mlflow

    _use_uri(resolve_tracking_uri(cfg))
    if run_id is not None:
        run = mlflow.start_run(run_id=run_id, tags=dict(tags or {}) or None)
        if ERROR_TAG in run.data.tags:
            # Resumed: the error that ended its earlier attempt no longer describes the run.
            mlflow.MlflowClient().delete_tag(run_id, ERROR_TAG)
        return run
    experiment_id = ensure_experiment(cfg)
    return mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {}) or None
    )


def end_run() -> None:
    """End the active run as FINISHED."""
    import mlflow

    mlflow.end_run()


def end_run_after_error(error: BaseException) -> None:
    """End the active run as FAILED (KILLED for an interrupt) with the error in its
    ``mvtcae.error`` tag. A tracking failure here is logged, never raised over ``error``."""
    import mlflow

    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        if mlflow.active_run() is not None:
            message = redact_text(f"{type(error).__name__}: {error}")[:5000]
            mlflow.set_tag(ERROR_TAG, message)
        mlflow.end_run(status=status)
    except Exception as tracking_error:  # noqa: BLE001 - keep the original error in front
        logger.warning(
            "could not mark the MLflow run %s (%s: %s)",
            status,
            type(tracking_error).__name__,
            redact_text(str(tracking_error))[:300],
        )


def _active_run_id(run_id: str | None) -> str:
    import mlflow

    if run_id is not None:
        return run_id
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no MLflow run: pass run_id or call inside `with start_run(cfg):`")
    return run.info.run_id


# ----------------------------------------------------------------------------- config, metrics


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config to ``{"section.key": "value"}`` strings fit for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def log_config(
    config: Mapping[str, Any] | BaseModel,
    *,
    run_id: str | None = None,
    tracking: TrackingSection | None = None,
    artifact_file: str = "config.yaml",
) -> dict[str, str]:
    """Log the config as flattened params plus the full YAML file; return the params."""
    from mlflow.entities import Param

    as_dict = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    as_dict = redact(as_dict)  # a URI in the config may carry a password
    params = flatten_config(as_dict)
    run_id = _active_run_id(run_id)
    client = client_for(tracking)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])
    client.log_text(run_id, yaml.safe_dump(as_dict, sort_keys=False), artifact_file)
    return params


def log_metrics(
    metrics: Mapping[str, float],
    *,
    step: int | None = None,
    run_id: str | None = None,
    tracking: TrackingSection | None = None,
) -> None:
    """Log finite float metrics in one batch. Non-finite values are not logged as metrics: they
    are named in a warning and in the run's ``mvtcae.nonfinite_metrics`` tag."""
    import time

    from mlflow.entities import Metric

    run_id = _active_run_id(run_id)
    now = int(time.time() * 1000)
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    items = [Metric(k, v, now, step or 0) for k, v in finite.items()]
    client = client_for(tracking)
    log_in_batches(client, run_id, items)
    bad = sorted(k for k in metrics if k not in finite)
    if bad:
        shown = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
        logger.warning("run %s: non-finite metrics not logged: %s", run_id, shown)
        client.set_tag(run_id, "mvtcae.nonfinite_metrics", shown[:5000])


def log_evaluation(
    report: Any,
    *,
    run_id: str | None = None,
    tracking: TrackingSection | None = None,
    step: int | None = None,
    artifact_dir: str = "evaluation",
) -> None:
    """Log an `EvalReport`: its metrics, its JSON and its plots under ``artifact_dir/``."""
    run_id = _active_run_id(run_id)
    log_metrics(report.metrics, step=step, run_id=run_id, tracking=tracking)
    client = client_for(tracking)
    client.log_text(
        run_id, json.dumps(report.to_dict(), indent=2), f"{artifact_dir}/evaluation.json"
    )
    for path in report.plots.values():
        client.log_artifact(run_id, str(path), artifact_path=f"{artifact_dir}/plots")
