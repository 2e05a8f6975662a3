"""MLflow for the platform: runs, metrics that survive outages, the registry and its promotion
gate, the pyfunc model and its serving code, and loading models back.

``from mvtcae import tracking`` gives the functions the platform's other packages use; the
modules are ``mlflow_runs``, ``run_logger``, ``registry``, ``loading``, ``pyfunc`` (with
``model_code``, the models-from-code file MLflow executes), ``dataset_lineage`` (datasets as run
inputs, the chain model version -> run -> config -> dataset) and ``auth``.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exported lazily: the served model imports `mvtcae.tracking.pyfunc` alone, so its environment
# needs torch, safetensors, numpy, pandas and mlflow only (not pydantic, YAML or pyarrow).
_LAZY = {
    "CHALLENGER": "mvtcae.tracking.registry",
    "CHAMPION": "mvtcae.tracking.registry",
    "MODEL_ARTIFACT_NAME": "mvtcae.tracking.registry",
    "RegisteredVersion": "mvtcae.tracking.registry",
    "RegistryDatasetMismatchError": "mvtcae.tracking.registry",
    "best_version": "mvtcae.tracking.registry",
    "check_registry_dataset": "mvtcae.tracking.registry",
    "client_for": "mvtcae.tracking.mlflow_runs",
    "converge_champion": "mvtcae.tracking.registry",
    "current_champion": "mvtcae.tracking.registry",
    "decide_promotion": "mvtcae.tracking.registry",
    "download_model_dir": "mvtcae.tracking.loading",
    "end_run": "mvtcae.tracking.mlflow_runs",
    "end_run_after_error": "mvtcae.tracking.mlflow_runs",
    "ensure_experiment": "mvtcae.tracking.mlflow_runs",
    "flatten_config": "mvtcae.tracking.mlflow_runs",
    "load_champion": "mvtcae.tracking.loading",
    "load_model_from": "mvtcae.tracking.loading",
    "log_config": "mvtcae.tracking.mlflow_runs",
    "log_evaluation": "mvtcae.tracking.mlflow_runs",
    "log_metrics": "mvtcae.tracking.mlflow_runs",
    "log_model_and_register": "mvtcae.tracking.registry",
    "log_pyfunc_model": "mvtcae.tracking.registry",
    "promote_if_better": "mvtcae.tracking.registry",
    "resolve_artifact_location": "mvtcae.tracking.mlflow_runs",
    "resolve_tracking_uri": "mvtcae.tracking.mlflow_runs",
    "start_run": "mvtcae.tracking.mlflow_runs",
    "version_values": "mvtcae.tracking.registry",
}

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "MODEL_ARTIFACT_NAME",
    "RegisteredVersion",
    "RegistryDatasetMismatchError",
    "best_version",
    "check_registry_dataset",
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


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mvtcae.tracking' has no attribute {name!r}")
