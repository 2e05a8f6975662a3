"""What the cluster's clients, its MLflow server and its jobs see: environment variables and the
submitted job's runtime env (paths of the token and credentials files, never their content)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from mvtcae.cluster.spec import RUNTIME_ENV, ClusterSpec, project_dir
from mvtcae.tracking import auth as mlflow_auth

# Client-side settings that would point Ray at another cluster or another token.
_FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
# ... and MLflow settings that would log in as someone else or configure another auth server.
_FOREIGN_MLFLOW_ENV = (
    mlflow_auth.USERNAME_ENV,
    mlflow_auth.PASSWORD_ENV,
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


def client_env(spec: ClusterSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes and clients of this cluster: token auth with its token,
    its MLflow server and the path (only) of its MLflow credentials file."""
    env = dict(os.environ if base is None else base)
    for key in _FOREIGN_RAY_ENV + _FOREIGN_MLFLOW_ENV:
        env.pop(key, None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(spec.token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # Jobs find the tracking server and shared storage even when submitted by hand.
        MLFLOW_TRACKING_URI=spec.mlflow_uri,
        MVTCAE_MLFLOW_CREDENTIALS_FILE=str(spec.mlflow_credentials_path),
        MVTCAE_STORAGE_PATH=str(spec.storage_dir),
        # Ray's own metrics exporters default to fixed ports shared by every local cluster.
        AUTOSCALER_METRIC_PORT=str(spec.port_base + 6),
        DASHBOARD_METRIC_PORT=str(spec.port_base + 7),
        # Ray's state API (Train V2's placement-group cleaner uses it inside workers) otherwise
        # auto-detects the cluster by scanning the host, and fails when others run Ray here too.
        RAY_API_SERVER_ADDRESS=spec.dashboard_url,
        # A job's `python ...` entrypoint must find this environment's interpreter.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
    )
    return env


def mlflow_server_env(spec: ClusterSpec) -> dict[str, str]:
    """The MLflow server's environment: the clients' one plus its basic-auth config's path."""
    return {**client_env(spec), "MLFLOW_AUTH_CONFIG_PATH": str(spec.mlflow_auth_config_path)}


def runtime_env(spec: ClusterSpec) -> dict[str, Any]:
    """The submitted job's runtime env: infra/local/runtime_env.yaml plus this cluster's URIs
    and the path of its MLflow credentials file (Ray shows env_vars in the dashboard: never the
    password itself; the YAML's setup hook reads the file in every worker)."""
    env = yaml.safe_load((project_dir() / RUNTIME_ENV).read_text())
    env.setdefault("env_vars", {}).update(
        MLFLOW_TRACKING_URI=spec.mlflow_uri,
        MVTCAE_MLFLOW_CREDENTIALS_FILE=str(spec.mlflow_credentials_path),
        MVTCAE_STORAGE_PATH=str(spec.storage_dir),
    )
    return env


def client_exports(spec: ClusterSpec) -> dict[str, str]:
    """The variables that point `ray job ...` and MLflow clients at this cluster (paths of the
    token and credentials files, never their content)."""
    return {
        "RAY_ADDRESS": spec.dashboard_url,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(spec.token_path),
        "MLFLOW_TRACKING_URI": spec.mlflow_uri,
        mlflow_auth.CREDENTIALS_FILE_ENV: str(spec.mlflow_credentials_path),
    }
