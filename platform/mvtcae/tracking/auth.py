"""MLflow credentials from a private file, for clients and jobs of a server with basic auth.

A tracking server started with ``--app-name basic-auth`` (the local cluster's) answers 401 to a
request without a username and password. Secrets must not travel through a job's runtime
environment (Ray shows its ``env_vars`` in the dashboard), so clients and jobs get only the PATH
of an owner-only INI file in ``MVTCAE_MLFLOW_CREDENTIALS_FILE``, in the format of
``~/.mlflow/credentials``::

    [mlflow]
    mlflow_tracking_username = admin
    mlflow_tracking_password = ...

:func:`apply_credentials_file` copies them into ``MLFLOW_TRACKING_USERNAME`` /
``MLFLOW_TRACKING_PASSWORD`` of the current process, where MLflow reads them on every request.
It runs in drivers (through ``tracking.resolve_tracking_uri``) and in every Ray worker (the
runtime environment's ``worker_process_setup_hook``).
"""

from __future__ import annotations

import configparser
import logging
import os
import stat
from pathlib import Path

from mvtcae.model.errors import UserError

CREDENTIALS_FILE_ENV = "MVTCAE_MLFLOW_CREDENTIALS_FILE"
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
SECTION = "mlflow"

_log = logging.getLogger(__name__)


class CredentialsFileError(UserError, RuntimeError):
    """The credentials file is missing, unreadable or malformed (the message names the file)."""


def format_credentials(username: str, password: str) -> str:
    """The text of a credentials file (MLflow's ``~/.mlflow/credentials`` format)."""
    return (
        f"[{SECTION}]\n{USERNAME_ENV.lower()} = {username}\n{PASSWORD_ENV.lower()} = {password}\n"
    )


def read_credentials(path: Path) -> tuple[str, str]:
    """(username, password) from a credentials file; CredentialsFileError if that fails.

    Error messages name the file and what is wrong with it, never its content: a parser's own
    message can quote a line, which may hold the password.
    """
    parser = configparser.ConfigParser(interpolation=None)  # a password may contain '%'
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise CredentialsFileError(
            f"cannot read the MLflow credentials file {path} ({e.strerror}); it is named by "
            f"{CREDENTIALS_FILE_ENV}"
        ) from None
    except (configparser.Error, UnicodeDecodeError):
        raise CredentialsFileError(
            f"the MLflow credentials file {path} is not an INI file with an [{SECTION}] section"
        ) from None
    if not parser.has_section(SECTION):
        raise CredentialsFileError(f"the MLflow credentials file {path} has no [{SECTION}] section")
    values = parser[SECTION]
    username = values.get(USERNAME_ENV.lower(), "").strip()
    password = values.get(PASSWORD_ENV.lower(), "").strip()
    missing = [k.lower() for k, v in ((USERNAME_ENV, username), (PASSWORD_ENV, password)) if not v]
    if missing:
        raise CredentialsFileError(
            f"the MLflow credentials file {path} has no value for {', '.join(missing)}"
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        _log.warning("%s is readable by other users; `chmod 600` it", path)
    return username, password


def apply_credentials_file() -> None:
    """Set MLflow's username and password variables from ``$MVTCAE_MLFLOW_CREDENTIALS_FILE``.

    Does nothing when that variable is unset or when the process already has either
    ``MLFLOW_TRACKING_USERNAME`` or ``MLFLOW_TRACKING_PASSWORD`` (explicit settings win).
    """
    path = os.environ.get(CREDENTIALS_FILE_ENV)
    if not path or os.environ.get(USERNAME_ENV) or os.environ.get(PASSWORD_ENV):
        return
    username, password = read_credentials(Path(path))
    os.environ[USERNAME_ENV] = username
    os.environ[PASSWORD_ENV] = password
