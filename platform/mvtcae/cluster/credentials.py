"""The cluster's secrets: Ray's auth token and the MLflow server's admin credentials and
basic-auth files, each created once, owner-only; nothing here prints or logs a secret."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mvtcae.cluster.spec import ClusterError, ClusterSpec
from mvtcae.tracking import auth as mlflow_auth

MLFLOW_ADMIN = "admin"


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` owner-only (0600) with ``text``; fails if it exists (O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_token(spec: ClusterSpec) -> None:
    """Create this cluster's auth token (owner-only file) unless it exists."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    if not spec.token_path.exists():
        _write_private(spec.token_path, secrets.token_hex(32))


def ensure_mlflow_auth(spec: ClusterSpec) -> None:
    """Create, unless they exist, the MLflow admin credentials and the server's auth files.

    The credentials file is the source of truth: MLflow creates the admin user from the config's
    password on its first start only, so the password is generated once and kept with the user
    store. Every file is owner-only; nothing here prints or logs the password.
    """
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    spec.mlflow_dir.mkdir(parents=True, exist_ok=True)
    if not spec.mlflow_credentials_path.exists():
        if spec.mlflow_auth_db.exists():
            raise ClusterError(
                f"{spec.mlflow_credentials_path} is missing but the MLflow user store "
                f"{spec.mlflow_auth_db} exists, with the admin password it was created with: "
                f"restore the credentials file, or delete {spec.mlflow_auth_db} (it holds only "
                "MLflow users and permissions) to create a new admin password"
            )
        password = secrets.token_urlsafe(24)
        _write_private(
            spec.mlflow_credentials_path, mlflow_auth.format_credentials(MLFLOW_ADMIN, password)
        )
    try:
        username, password = mlflow_auth.read_credentials(spec.mlflow_credentials_path)
    except mlflow_auth.CredentialsFileError as e:
        raise ClusterError(str(e)) from None
    if not spec.mlflow_auth_config_path.exists():
        _write_private(
            spec.mlflow_auth_config_path,
            "[mlflow]\n"
            # Only the admin exists; an account an admin adds later sees what it is granted.
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{spec.mlflow_auth_db}\n"
            f"admin_username = {username}\n"
            f"admin_password = {password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Spares a PBKDF2 hash per request; with one server worker a password changed
            # through the API takes effect at once.
            "auth_cache_ttl_seconds = 300\n",
        )
    if not spec.mlflow_server_env_path.exists():
        # The basic-auth app signs its CSRF tokens with a static key.
        _write_private(
            spec.mlflow_server_env_path, f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n"
        )


def mlflow_credentials(spec: ClusterSpec) -> tuple[str, str]:
    """(username, password) of this cluster's MLflow server."""
    try:
        return mlflow_auth.read_credentials(spec.mlflow_credentials_path)
    except mlflow_auth.CredentialsFileError as e:
        raise ClusterError(f"{e}: run `make cluster-up` first") from None


def read_token(spec: ClusterSpec) -> str:
    """This cluster's Ray auth token."""
    try:
        return spec.token_path.read_text().strip()
    except FileNotFoundError:
        raise ClusterError(f"no token at {spec.token_path}: run `make cluster-up` first") from None
