"""The cluster's state file, ``<state dir>/state.json``: its addresses and the processes `up`
started, written atomically as each one starts."""

from __future__ import annotations

import json
import logging
from typing import Any

from mvtcae.cluster.process_trees import is_running
from mvtcae.cluster.spec import ClusterSpec

_log = logging.getLogger(__name__)


def load_state(spec: ClusterSpec) -> dict[str, Any] | None:
    """The recorded state; None without a state file, no processes if the file is unreadable."""
    try:
        return json.loads(spec.state_file.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        _log.warning("%s is not valid JSON; its processes are unknown", spec.state_file)
        return {}


def save_state(spec: ClusterSpec, processes: list[dict[str, Any]]) -> None:
    """Record the cluster's addresses and ``processes``, replacing the state file atomically."""
    state = {
        "dashboard_url": spec.dashboard_url,
        "gcs_address": spec.gcs_address,
        "mlflow_uri": spec.mlflow_uri,
        "storage_path": str(spec.storage_dir),
        "token_path": str(spec.token_path),
        "mlflow_credentials_path": str(spec.mlflow_credentials_path),
        "processes": processes,
    }
    tmp = spec.state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(spec.state_file)


def recorded_processes(spec: ClusterSpec) -> list[dict[str, Any]]:
    """Every process `up` (or `start-node`) recorded, running or not."""
    return list((load_state(spec) or {}).get("processes", []))


def running_processes(spec: ClusterSpec) -> list[dict[str, Any]]:
    """The recorded processes that still run."""
    return [p for p in recorded_processes(spec) if is_running(p)]
