"""Helpers of the local-cluster tests: a free port block, short temp dirs, the cluster CLI, and
signals held back while a cluster is being stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

from mvtcae import cluster
from testkit import free_port_block

REPO = Path(__file__).resolve().parents[2]
# Set by tests/cluster/test_interrupt.py for the pytest it starts: where the `running` fixture
# writes its MVTCAE_CLUSTER_* settings before `up`, so that the parent can check on the cluster.
REPORT_ENV = "MVTCAE_TEST_CLUSTER_REPORT"
# ... and where tests/cluster/interrupted_session.py announces that its test runs.
STARTED_ENV = "MVTCAE_TEST_INTERRUPT_STARTED"


WORKER_NODES_ENV = "MVTCAE_TEST_CLUSTER_WORKER_NODES"
"""Worker nodes of a test cluster (default 2: a head and two nodes, as the node-loss drill
needs); tests/cluster/test_interrupt.py asks its child pytest for one."""


def cluster_overrides(state_dir: Path, tag: str = "") -> dict[str, str]:
    """MVTCAE_CLUSTER_* settings of a test cluster: free ports, state in ``state_dir``, and temp
    dirs short enough for Ray's socket paths (/tmp/mvt-<pid><tag>-h, -n, -n-3), and
    worker nodes beside the head (`WORKER_NODES_ENV`)."""
    worker_nodes = int(os.environ.get(WORKER_NODES_ENV, "2"))
    base = free_port_block(worker_nodes)
    short = f"/tmp/mvt-{os.getpid()}{tag}"
    return {
        "MVTCAE_CLUSTER_DIR": str(state_dir),
        "MVTCAE_CLUSTER_HEAD_TMP": f"{short}-h",
        "MVTCAE_CLUSTER_NODE_TMP": f"{short}-n",
        "MVTCAE_CLUSTER_PORT_BASE": str(base),
        "MVTCAE_CLUSTER_DASHBOARD_PORT": str(base + 8),
        "MVTCAE_CLUSTER_MLFLOW_PORT": str(base + 9),
        cluster.WORKER_NODES_ENV: str(worker_nodes),
    }


def spec_for(overrides: dict[str, str]) -> cluster.ClusterSpec:
    """The spec that `python -m mvtcae.cli cluster` computes under these settings."""
    with mock.patch.dict(os.environ, overrides):
        return cluster.default_spec()


def cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python -m mvtcae.cli cluster ARGS`` from the repository, capturing its output.

    Interrupted (KeyboardInterrupt, a timeout), the command gets a SIGTERM and up to a minute to
    stop what it started itself, as `up` does, before it is killed.
    """
    argv = [sys.executable, "-m", "mvtcae.cli", "cluster", *args]
    with subprocess.Popen(
        argv, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException:
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (stopping a cluster must not be cut short),
    then deliver one that came to the handlers in place before."""
    received: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: received.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        if received:
            print(f"signal {received[0]} held back while stopping a cluster", file=sys.stderr)
            signal.raise_signal(received[0])
