"""MLflow for the platform: runs, metrics that survive outages, the registry and its promotion
gate, the pyfunc model and its serving code, and loading models back.

``from mvtcae import tracking`` gives the functions the platform's other packages use; the
modules are ``runs``, ``run_logger``, ``registry``, ``loading``, ``pyfunc`` (with
``model_code``, the models-from-code file MLflow executes) and ``auth``.
"""

from mvtcae.tracking.loading import download_model_dir, load_champion, load_model_from
from mvtcae.tracking.registry import (
    CHALLENGER,
    CHAMPION,
    MODEL_ARTIFACT_NAME,
    RegisteredVersion,
    best_version,
    converge_champion,
    current_champion,
    decide_promotion,
    log_model_and_register,
    log_pyfunc_model,
    promote_if_better,
    version_values,
)
from mvtcae.tracking.runs import (
    client_for,
    end_run,
    end_run_after_error,
    ensure_experiment,
    flatten_config,
    log_config,
    log_evaluation,
    log_metrics,
    resolve_artifact_location,
    resolve_tracking_uri,
    start_run,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "MODEL_ARTIFACT_NAME",
    "RegisteredVersion",
    "best_version",
    "client_for",
    "converge_champion",
    "current_champion",
    "decide_promotion",
    "download_model_dir",
    "end_run",
    "end_run_after_error",
    "ensure_experiment",
    "flatten_config",
    "load_champion",
    "load_model_from",
    "log_config",
    "log_evaluation",
    "log_metrics",
    "log_model_and_register",
    "log_pyfunc_model",
    "promote_if_better",
    "resolve_artifact_location",
    "resolve_tracking_uri",
    "start_run",
    "version_values",
]
