"""An interrupted test run stops the processes its fixtures started.

A child pytest (its own process session) runs tests/cluster/interrupted_session.py, whose test
holds the real `running` fixture: a local cluster started with `python -m mvtcae.cli cluster up`.
Once the test runs, the child gets SIGTERM (turned into a KeyboardInterrupt by
tests/conftest.py) or SIGINT (Ctrl-C); it must exit as interrupted, after the fixture's
finalizer stopped every recorded process and every process in the cluster's temp dirs.
Whatever is left is stopped here by PID, and the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import clusterkit
import pytest

from mvtcae import cluster
from mvtcae.cluster.process_trees import is_running
from mvtcae.storage.processes import group_members

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

START_TIMEOUT_S = 300  # child pytest start-up and `cluster up` (30-60 s here)
EXIT_TIMEOUT_S = 120  # the fixture's `cluster.down` (SIGKILL after 8 s) and pytest's exit


def _wait_until(done: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not done() and time.monotonic() < deadline:
        time.sleep(0.5)


def _alive(records: list[dict[str, Any]]) -> list[int]:
    return [r["pid"] for r in records if is_running(r)]


def _sigint_not_ignored() -> None:
    # A run started with SIGINT ignored (a background job of a non-interactive shell) passes
    # that on to its children; the child pytest must see Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_leftovers(
    child: subprocess.Popen, spec: cluster.ClusterSpec | None, records: list[dict[str, Any]]
) -> None:
    """Stop, by PID, whatever the interrupted run left: the child pytest's own process group
    (it leads its session), the recorded cluster processes and those in the temp dirs."""
    if child.poll() is None:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    else:  # the group outlives its reaped leader only while members are left; its id with it
        for pid in group_members(child.pid):
            os.kill(pid, signal.SIGKILL)
    if spec is not None:
        cluster.stop_process_trees(records, grace_s=2)
        cluster.stop_strays(spec)
        for temp_dir in spec.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


# SIGTERM (what CI and `timeout` send; tests/conftest.py turns it into the KeyboardInterrupt
# that Ctrl-C raises): the same finalizers run for both after that, so one drill covers both.
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=lambda s: s.name)
def test_interrupted_run_stops_the_cluster_its_fixture_started(sig, tmp_path):
    report, started, log_path = tmp_path / "cluster.json", tmp_path / "started", tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MVTCAE_CLUSTER_")}
    env |= {clusterkit.REPORT_ENV: str(report), clusterkit.STARTED_ENV: str(started)}
    env[clusterkit.WORKER_NODES_ENV] = "1"  # the finalizer's work is the same for any count
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--basetemp={tmp_path / 'child'}",
        "tests/cluster/interrupted_session.py",
    ]
    sigint_ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            argv,
            cwd=clusterkit.REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_sigint_not_ignored if sigint_ignored else None,
        )
    spec: cluster.ClusterSpec | None = None
    records: list[dict[str, Any]] = []
    try:
        _wait_until(lambda: started.exists() or child.poll() is not None, START_TIMEOUT_S)
        assert started.exists() and child.poll() is None, log_path.read_text()[-4000:]
        spec = clusterkit.spec_for(json.loads(report.read_text()))
        records = json.loads(spec.state_file.read_text())["processes"]
        assert [r["name"] for r in records] == ["mlflow", "ray-head", "ray-node2"]
        assert len(_alive(records)) == 3 and cluster.strays(spec)

        os.kill(child.pid, sig)
        try:
            child.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pytest still running {EXIT_TIMEOUT_S}s after {sig.name}")
        output = log_path.read_text()
        assert child.returncode == pytest.ExitCode.INTERRUPTED, output[-4000:]
        assert "KeyboardInterrupt" in output
        # The module-scoped fixture's finalizer ran `cluster.down` to its end.
        assert not spec.state_file.exists(), output[-4000:]
        assert _alive(records) == [], output[-4000:]
        assert cluster.strays(spec) == [], output[-4000:]
    finally:
        _stop_leftovers(child, spec, records)
