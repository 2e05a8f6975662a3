"""What ``mvtcae cluster`` does: ``up`` (after clearing what an earlier cluster left), ``down``
and ``submit``."""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mvtcae.cluster.commands import (
    console_script,
    mlflow_server_argv,
    ray_start_argv,
    submit_argv,
)
from mvtcae.cluster.credentials import ensure_mlflow_auth, ensure_token, read_token
from mvtcae.cluster.environment import client_env, mlflow_server_env
from mvtcae.cluster.health import (
    alive_nodes,
    busy_ports,
    check_mlflow_auth,
    http_get,
    ray_node_id,
)
from mvtcae.cluster.process_trees import is_running, spawn, stop_process_trees, stop_strays
from mvtcae.cluster.spec import ClusterError, ClusterSpec, project_dir
from mvtcae.cluster.state import load_state, running_processes, save_state
from mvtcae.storage.processes import descendants, signal_all

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


def _node_record(state: dict[str, Any] | None, node: int) -> tuple[int, dict[str, Any]]:
    """Where in the state's processes worker node ``node`` (2: the first after the head) is."""
    records = (state or {}).get("processes", [])
    name = f"ray-node{node}"
    for index, record in enumerate(records):
        if record["name"] == name:
            return index, record
    nodes = sorted(r["name"].removeprefix("ray-node") for r in records if "node" in r["name"])
    raise ClusterError(
        f"no worker node {node} in this cluster (its worker nodes: {', '.join(nodes) or 'none'}; "
        "node 1 is the head)"
    )


def kill_node(spec: ClusterSpec, node: int) -> list[int]:
    """SIGKILL worker node ``node`` at once, with no notice: its ``ray start``, raylet and every
    process below it, by PID (a machine that vanished). Returns the PIDs signalled; the record
    stays, so that `start_node` and `down` still know the node."""
    _, record = _node_record(load_state(spec), node)
    if not is_running(record):
        raise ClusterError(f"worker node {node} is not running (pid {record['pid']} has exited)")
    pids = {record["pid"], *descendants(record["pid"])}
    signal_all(pids, signal.SIGKILL)
    return sorted(pids)


def drain_node(
    spec: ClusterSpec, node: int, deadline_s: int, kill_at_deadline: bool = True
) -> list[int]:
    """Preempt worker node ``node`` as a cloud reclaims a spot VM: ask Ray to drain it for
    preemption with ``deadline_s`` seconds left (``ray drain-node``; Ray Train's preemption
    watcher then tells the run's workers), and, with ``kill_at_deadline``, SIGKILL it at the
    deadline (`kill_node`; Ray itself never kills a drained node). Returns the PIDs killed."""
    _, record = _node_record(load_state(spec), node)
    if not is_running(record):
        raise ClusterError(f"worker node {node} is not running (pid {record['pid']} has exited)")
    node_id = ray_node_id(spec, read_token(spec), node)
    if node_id is None:
        raise ClusterError(f"worker node {node} is not an ALIVE node of the Ray cluster")
    argv = [
        console_script("ray"),
        "drain-node",
        f"--address={spec.gcs_address}",
        f"--node-id={node_id}",
        "--reason=DRAIN_NODE_REASON_PREEMPTION",
        f"--reason-message=mvtcae cluster drain-node {node}",
        f"--deadline-remaining-seconds={deadline_s}",
    ]
    done = subprocess.run(argv, env=client_env(spec), capture_output=True, text=True)
    # Ray's deadline runs from when the GCS took the request, inside the command (which takes
    # seconds to start): counted from its end, the kill comes just after Ray's deadline, never
    # before it (a node killed early fails the group's collectives before Ray acts on the drain).
    deadline = time.monotonic() + deadline_s
    if done.returncode != 0:
        raise ClusterError(f"ray drain-node failed ({done.returncode}): {done.stderr.strip()}")
    _log.info("worker node %d (%s) drained for preemption, %d s left", node, node_id, deadline_s)
    if not kill_at_deadline:
        return []
    time.sleep(max(0.0, deadline - time.monotonic()))
    return kill_node(spec, node)


def start_node(spec: ClusterSpec, node: int) -> dict[str, Any]:
    """Start worker node ``node`` again (after `kill_node` or a crash) with the command it was
    started with, recorded in place of the dead process. Returns the new record.

    The dead node's Ray temp dir is moved into the cluster's log dir first: a node that joins
    with the old one would have Ray's log monitor send the dead workers' output to the jobs'
    logs a second time (seen in the node-loss drill: epoch lines of a killed rank 0 twice).
    """
    state = load_state(spec)
    index, record = _node_record(state, node)
    if is_running(record):
        raise ClusterError(f"worker node {node} is running (pid {record['pid']})")
    temp_dir = spec.temp_dir(node - 1)
    if temp_dir.exists():
        kept = spec.log_dir / f"{record['name']}-lost-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(temp_dir, kept)
        _log.info("the lost node's Ray logs: %s", kept)
    records = list((state or {}).get("processes", []))
    records[index] = spawn(record["name"], record["argv"], client_env(spec), spec)
    save_state(spec, records)
    return records[index]


def submit(
    spec: ClusterSpec, entrypoint: list[str], submission_id: str | None = None, wait: bool = True
) -> int:
    """Submit a job to the running local cluster; the exit status of ``ray job submit``."""
    if not running_processes(spec):
        raise ClusterError(f"no local cluster running from {spec.state_dir}: `make cluster-up`")
    argv = submit_argv(spec, entrypoint, submission_id, wait)
    _log.debug("+ %s", shlex.join(argv))
    return subprocess.run(argv, cwd=project_dir(), env=client_env(spec)).returncode
