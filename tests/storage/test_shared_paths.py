"""A multi-node run refuses local paths that some node does not see: a real two-node Ray on this
machine whose second node runs in its own mount namespace, where an empty tmpfs hides the
directory that holds the dataset and the run storage (as a node-local disk would)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mvtcae import cluster
from testkit import free_port_block, write_tiny_views

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

UNSHARE = shutil.which("unshare")


def _can_hide_a_directory(tmp_path: Path) -> bool:
    target = tmp_path / "probe"
    target.mkdir()
    argv = [UNSHARE, "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {target}"]
    return bool(UNSHARE) and subprocess.run(argv, capture_output=True).returncode == 0


def _ray_start(spec: cluster.ClusterSpec, index: int) -> list[str]:
    argv = cluster.ray_start_argv(spec, index)
    # No dashboard and no token auth: this test needs nodes and tasks only.
    argv = [a for a in argv if not a.startswith(("--dashboard-", "--include-dashboard"))]
    return [*argv, "--include-dashboard=false"] if index == 0 else argv


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[cluster.ClusterSpec, Path]]:
    """A head node, and a second node for which ``tmp_path/hidden`` is an empty tmpfs."""
    if not _can_hide_a_directory(tmp_path):
        pytest.skip("needs `unshare -m` and mount rights (root in a container) to hide a path")
    base = free_port_block()
    short = f"/tmp/mvs-{os.getpid()}"
    spec = cluster.ClusterSpec(
        tmp_path / "state",
        Path(f"{short}-h"),
        Path(f"{short}-n"),
        base,
        base + 8,
        base + 9,
        cpus_per_node=1,
        object_store_bytes=128 * 1024**2,
    )
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    cluster.ensure_token(spec)  # Ray's token auth, as `mvtcae cluster up` sets it up
    env = cluster.client_env(spec)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []
    try:
        for index in (0, 1):
            argv = _ray_start(spec, index)
            if index == 1:
                script = f'mount -t tmpfs tmpfs "{hidden}" && exec "$@"'
                argv = [UNSHARE, "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv]
            with open(logs / f"node{index}.log", "wb") as log:
                procs.append(
                    subprocess.Popen(
                        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
            if index == 0:
                time.sleep(3)
        yield spec, hidden
    finally:
        for proc in procs:  # by PID: each node's session (process group) and what it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)  # `ray start --block` then takes its group down
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        cluster.stop_strays(spec)


# The driver runs in its own interpreter with the cluster's environment (token auth is read
# when Ray first starts in a process).
DRIVER = """
import json, sys, time
import ray
from mvtcae.storage.ray_session import NodeLocalPathError, check_shared_paths, largest_node_cpus

ray.init(address=sys.argv[1])
deadline = time.monotonic() + 90
while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
    assert time.monotonic() < deadline, "the second Ray node never joined"
    time.sleep(0.5)
answers = []
for case in json.loads(sys.argv[2]):
    try:
        check_shared_paths(*case)
        answers.append("ok")
    except NodeLocalPathError as err:
        answers.append(str(err))
print(json.dumps(answers + [largest_node_cpus(), largest_node_cpus(with_gpu=True)]))
"""


def test_node_local_dataset_and_storage_are_refused_shared_ones_pass(two_nodes, tmp_path: Path):
    spec, hidden = two_nodes
    node_local_data = write_tiny_views(
        hidden / "data", n_train=20, n_test=10, classes=2, width=3, name="hidden"
    )
    shared_data = write_tiny_views(
        tmp_path / "shared" / "data", n_train=20, n_test=10, classes=2, width=3, name="shared"
    )
    cases = [
        (
            {"data.dir": str(node_local_data / "manifest.json")},
            {"train.storage_path": str(hidden / "runs")},
        ),
        (
            {"data.dir": str(shared_data / "manifest.json")},
            {"train.storage_path": str(tmp_path / "shared" / "runs")},
        ),
        ({}, {"train.storage_path": "s3://bucket/runs"}),
    ]
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, spec.gcs_address, json.dumps(cases)],
        env=cluster.client_env(spec),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    refused, shared, bucket, largest, largest_gpu = json.loads(out.stdout.strip().splitlines()[-1])
    # Two CPUs in the cluster, one per node: one task can have at most one (no GPU node: 1).
    assert (largest, largest_gpu) == (1, 1)
    assert f"data.dir: {node_local_data / 'manifest.json'} does not read the same" in refused
    assert f"train.storage_path: {hidden / 'runs'}" in refused
    assert "s3://" in refused  # says what to use instead
    assert list((hidden / "runs").iterdir()) == []  # the marker is cleaned up
    # Paths every node sees pass, and object-store URIs are not checked.
    assert (shared, bucket) == ("ok", "ok")
