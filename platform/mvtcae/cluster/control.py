"""What ``mvtcae cluster`` does: ``up`` (after clearing what an earlier cluster left), ``down``
and ``submit``."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvtcae.cluster.commands import mlflow_server_argv, ray_start_argv, submit_argv
from mvtcae.cluster.credentials import ensure_mlflow_auth, ensure_token, read_token
from mvtcae.cluster.environment import client_env, mlflow_server_env
from mvtcae.cluster.health import alive_nodes, busy_ports, check_mlflow_auth, http_get
from mvtcae.cluster.process_trees import is_running, spawn, stop_process_trees, stop_strays
from mvtcae.cluster.spec import ClusterError, ClusterSpec, project_dir
from mvtcae.cluster.state import load_state, running_processes, save_state

_log = logging.getLogger(__name__)


def clear_stale(spec: ClusterSpec) -> list[int]:
    """Make way for `up`; return the PIDs it stopped.

    Refuses (ClusterError) while a process recorded by an earlier `up` still runs: that cluster
    may be in use, and only `make cluster-down` stops it. Otherwise stops, by PID, what an
    earlier cluster left behind (members of its recorded process groups, processes in its temp
    dirs) and removes its state file.
    """
    state = load_state(spec)
    spec = as_recorded(spec, state)
    records = (state or {}).get("processes", [])
    if alive := [r for r in records if is_running(r)]:
        listing = ", ".join(f"{r['name']} pid {r['pid']}" for r in alive)
        raise ClusterError(
            f"a cluster from {spec.state_dir} is already running ({listing}): "
            "`make cluster-down` first"
        )
    stopped = stop_process_trees(records) if records else set()
    stopped |= stop_strays(spec)
    if state is not None:
        spec.state_file.unlink()
        _log.warning("removed the state of an earlier cluster whose processes had exited")
    if stopped:
        _log.warning("stopped processes left by an earlier cluster: pids %s", sorted(stopped))
    return sorted(stopped)


def _wait(
    what: str, check: Callable[[], bool], timeout_s: float, records: list[dict[str, Any]]
) -> None:
    """Poll ``check`` until true; fail early, with the log's tail, if a started process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        for record in records:
            if not is_running(record):
                raise ClusterError(
                    f"{record['name']} exited while waiting for {what}; "
                    f"see {record['log']}:\n{_tail(record['log'])}"
                )
        time.sleep(1.0)
    raise ClusterError(
        f"timed out after {timeout_s:.0f}s waiting for {what}; logs in {records[-1]['log']}"
    )


def _tail(path: str, lines: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def up(spec: ClusterSpec, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start the head, ``spec.worker_nodes`` more nodes and the MLflow server; return the state.
    Stops all of it on failure.

    A cluster from an earlier `up` that still runs is refused; what one left behind is stopped
    first (`clear_stale`).
    """
    for path in spec.temp_dirs:
        # Ray's Unix sockets live under the temp dir; their paths are limited to ~107 bytes.
        if len(str(path)) > 40:
            raise ClusterError(f"temp dir {path} is too long for Ray's socket paths")
    clear_stale(spec)
    if busy := busy_ports(spec.all_ports()):
        raise ClusterError(
            f"ports already in use on 127.0.0.1: {busy[:10]}; choose another "
            "block with MVTCAE_CLUSTER_PORT_BASE / _DASHBOARD_PORT / _MLFLOW_PORT"
        )
    ensure_token(spec)
    ensure_mlflow_auth(spec)
    for path in (spec.storage_dir, spec.mlflow_dir / "artifacts", spec.log_dir):
        path.mkdir(parents=True, exist_ok=True)
    env = client_env(spec)
    token = read_token(spec)
    records: list[dict[str, Any]] = []

    def start(name: str, argv: list[str], process_env: dict[str, str]) -> None:
        # Recorded at once, so that an interrupted `up` or a later `down` finds every process.
        records.append(spawn(name, argv, process_env, spec))
        save_state(spec, records)

    try:
        start("mlflow", mlflow_server_argv(spec), mlflow_server_env(spec))
        start("ray-head", ray_start_argv(spec, 0), env)
        _wait("the Ray head", lambda: alive_nodes(spec, token) >= 1, timeout_s, records)
        for index in range(1, spec.worker_nodes + 1):
            start(f"ray-node{index + 1}", ray_start_argv(spec, index), env)
            _wait(
                f"Ray node {index + 1}",
                lambda n=index + 1: alive_nodes(spec, token) >= n,
                timeout_s,
                records,
            )
        _wait(
            "the MLflow server",
            lambda: http_get(f"{spec.mlflow_uri}/health")[0] == 200,
            timeout_s,
            records,
        )
        check_mlflow_auth(spec)
    except BaseException:
        down(spec)
        raise
    return load_state(spec) or {}


def as_recorded(spec: ClusterSpec, state: dict[str, Any] | None) -> ClusterSpec:
    """``spec`` with as many worker nodes as the recorded cluster started (its temp dirs are
    then all searched for strays, whatever this command was told)."""
    names = [r.get("name", "") for r in (state or {}).get("processes", [])]
    recorded = sum(1 for n in names if n.startswith("ray-node"))
    return dataclasses.replace(spec, worker_nodes=max(recorded, spec.worker_nodes))


def down(spec: ClusterSpec) -> list[int]:
    """Stop the recorded processes and anything left that runs in this cluster's temp dirs."""
    state = load_state(spec)
    spec = as_recorded(spec, state)
    stopped = stop_process_trees((state or {}).get("processes", []))
    # Processes re-parented away from the recorded trees (a detached job driver) still name
    # this cluster's temp dirs in their command line or working directory.
    try:
        stopped |= stop_strays(spec)
    finally:
        spec.state_file.unlink(missing_ok=True)
    return sorted(stopped)


def submit(
    spec: ClusterSpec, entrypoint: list[str], submission_id: str | None = None, wait: bool = True
) -> int:
    """Submit a job to the running local cluster; the exit status of ``ray job submit``."""
    if not running_processes(spec):
        raise ClusterError(f"no local cluster running from {spec.state_dir}: `make cluster-up`")
    argv = submit_argv(spec, entrypoint, submission_id, wait)
    _log.debug("+ %s", shlex.join(argv))
    return subprocess.run(argv, cwd=project_dir(), env=client_env(spec)).returncode
