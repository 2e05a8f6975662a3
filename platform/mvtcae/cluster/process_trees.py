"""The cluster's processes by PID: each started as the leader of a session of its own, stopped
with its process group and descendants, and the strays found by the cluster's temp dirs.

A process is recorded as ``{name, pid, start_time, log, argv}``; the /proc helpers are
`mvtcae.storage.processes`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from mvtcae.cluster.spec import ClusterError, ClusterSpec, project_dir
from mvtcae.storage.processes import (
    all_pids,
    belongs_to,
    descendants,
    group_members,
    is_alive,
    proc_stat,
    signal_all,
)


def strays(spec: ClusterSpec) -> list[int]:
    """Processes that still belong to this cluster (by its temp dirs), if any."""
    dirs = spec.temp_dirs
    me = os.getpid()
    return sorted(p for p in all_pids() if p != me and belongs_to(p, dirs))


def spawn(name: str, argv: list[str], env: dict[str, str], spec: ClusterSpec) -> dict[str, Any]:
    """Start ``argv`` as the leader of a new session; its PID is its process group id."""
    spec.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = spec.log_dir / f"{name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=project_dir(),
            start_new_session=True,
        )
    stat = proc_stat(proc.pid)
    return {
        "name": name,
        "pid": proc.pid,
        "start_time": stat[2] if stat else None,
        "log": str(log_path),
        "argv": argv,
    }


def is_running(record: dict[str, Any]) -> bool:
    """Whether the recorded process still runs (not another one that now has its PID)."""
    return is_alive((record["pid"], record["start_time"]))


def stop_process_trees(records: list[dict[str, Any]], grace_s: float = 8.0) -> set[int]:
    """SIGTERM recorded session leaders, their process groups and descendants, all at once;
    SIGKILL whatever is left after ``grace_s``. Returns the PIDs signalled.

    The grace is short: a Ray head's GCS and monitor take 20 s or more to honour SIGTERM, and a
    local cluster holds nothing that needs a graceful exit (checkpoints and runs are on disk).
    A recorded PID that now belongs to another process (its start time differs) is left alone.
    The group of a recorded leader that has exited is still stopped: while any member lives, the
    kernel does not hand the group's id (the leader's PID) to a new process, so the members are
    the leader's own children.
    """
    leaders = [r["pid"] for r in records if is_running(r)]
    groups = leaders + [r["pid"] for r in records if proc_stat(r["pid"]) is None]

    def members() -> set[int]:
        return set().union(*(group_members(pgid) for pgid in groups)) if groups else set()

    targets = set(leaders) | members()
    for pid in leaders:
        targets |= descendants(pid)
    signal_all(targets, signal.SIGTERM)
    alive = targets
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = {p for p in targets if proc_stat(p) is not None} | members()
        if not alive:
            return targets
        time.sleep(0.2)
    signal_all(alive | members(), signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(proc_stat(p) is not None for p in alive) and time.monotonic() < deadline:
        time.sleep(0.1)
    return targets


def stop_strays(spec: ClusterSpec, grace_s: float = 2.0) -> set[int]:
    """Stop, by PID, the processes that still run in this cluster's temp dirs (see `strays`):
    SIGTERM, SIGKILL after ``grace_s``. Returns the PIDs signalled; ClusterError if any survive.
    """
    found = set(strays(spec))
    if not found:
        return set()
    signal_all(found, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (alive := set(strays(spec))) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_all(alive, signal.SIGKILL)
    found |= alive
    deadline = time.monotonic() + 10
    while (remaining := strays(spec)) and time.monotonic() < deadline:
        time.sleep(0.2)
    if remaining:
        raise ClusterError(f"processes of this cluster survived SIGKILL: {remaining}")
    return found
