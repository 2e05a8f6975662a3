"""The local cluster's parts that need no running cluster: ports, environment, token, what a
submitted job uploads, and stopping process trees by PID (with real, short-lived processes)."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from mvtcae import cluster


@pytest.fixture
def spec(tmp_path):
    short = Path("/tmp") / f"mvt-{os.getpid()}"
    return cluster.ClusterSpec(
        state_dir=tmp_path / "state",
        head_temp_dir=Path(f"{short}-h"),
        node_temp_dir=Path(f"{short}-n"),
        port_base=17400,
        dashboard_port=17408,
        mlflow_port=17409,
    )


def test_ports_are_distinct_and_inside_the_block(spec):
    ports = spec.all_ports()
    assert len(ports) == len(set(ports))
    assert all(spec.port_base <= p < spec.port_base + 300 for p in ports)
    head, node = spec.node_ports(0), spec.node_ports(1)
    assert set(head.values()).isdisjoint(node.values())


def test_ray_start_commands_keep_nodes_apart_and_dashboard_local(spec):
    head, node = cluster.ray_start_argv(spec, 0), cluster.ray_start_argv(spec, 1)
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert f"--temp-dir={spec.head_temp_dir}" in head
    assert f"--temp-dir={spec.node_temp_dir}" in node
    assert f"--address={spec.gcs_address}" in node and "--head" not in node
    assert "--block" in head and "--block" in node
    server = cluster.mlflow_server_argv(spec)
    assert server[server.index("--host") + 1] == "127.0.0.1"
    assert server[server.index("--backend-store-uri") + 1].startswith("sqlite:///")


def test_client_env_uses_this_clusters_token_only(spec):
    foreign = {
        "PATH": "/usr/bin",
        "RAY_ADDRESS": "ray://elsewhere:10001",
        "RAY_AUTH_TOKEN": "someone-elses",
        "HOME": "/root",
    }
    env = cluster.client_env(spec, base=foreign)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(spec.token_path)
    assert "RAY_ADDRESS" not in env and "RAY_AUTH_TOKEN" not in env
    # Workers' state-API clients must not auto-detect among other Ray clusters on the host.
    assert env["RAY_API_SERVER_ADDRESS"] == spec.dashboard_url
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_token_is_private_and_kept(spec):
    cluster.ensure_token(spec)
    first = cluster.read_token(spec)
    assert len(first) == 64
    assert stat.S_IMODE(spec.token_path.stat().st_mode) == 0o600
    cluster.ensure_token(spec)
    assert cluster.read_token(spec) == first


def test_reading_a_missing_token_says_what_to_do(spec):
    with pytest.raises(cluster.ClusterError, match="make cluster-up"):
        cluster.read_token(spec)


def test_up_refuses_busy_ports_before_starting_anything(spec):
    with socket.socket() as s:
        s.bind(("127.0.0.1", spec.dashboard_port))
        s.listen()
        with pytest.raises(cluster.ClusterError, match=str(spec.dashboard_port)):
            cluster.up(spec)
    assert not spec.state_file.exists()


def test_submit_command_uploads_the_working_dir_with_the_clusters_uris(spec):
    argv = cluster.submit_argv(spec, ["python", "jobs/train.py", "--config", "c.yaml"], "job-1")
    assert argv[1:3] == ["job", "submit"]
    assert f"--address={spec.dashboard_url}" in argv and "--working-dir=." in argv
    assert "--submission-id=job-1" in argv
    assert argv[argv.index("--") + 1 :] == ["python", "jobs/train.py", "--config", "c.yaml"]
    env = cluster.runtime_env(spec)["env_vars"]
    assert env["MLFLOW_TRACKING_URI"] == spec.mlflow_uri
    assert env["MVTCAE_STORAGE_PATH"] == str(spec.storage_dir)


def test_runtime_env_is_valid_for_ray(spec):
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**cluster.runtime_env(spec))
    assert env["py_modules"] == ["platform/mvtcae"]


def test_what_must_not_travel_stays_out_of_the_uploaded_package(spec, tmp_path):
    # Ray's own packaging (what `ray job submit --working-dir` zips), without .gitignore help:
    # the runtime env's excludes plus the repository's .rayignore.
    from ray._private.runtime_env.packaging import create_package

    repo = tmp_path / "repo"
    keep = ["jobs/train.py", "jobs/configs/demo.yaml", "platform/mvtcae/data/__init__.py"]
    drop = [
        ".git/HEAD",
        ".venv/bin/python",
        "data/polymnist/part-0000.parquet",
        "datasets/x.npz",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/model.pt",
        "mlflow.db",
        "outputs/ray_results/run/result.json",
        "checkpoints/epoch-3/model.safetensors",
        "ray_results/run/result.json",
        ".cluster/auth_token",
        "platform/mvtcae/__pycache__/x.pyc",
    ]
    for name in keep + drop:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    shutil.copy(cluster.REPO_ROOT / ".rayignore", repo / ".rayignore")
    package = tmp_path / "pkg.zip"
    excludes = cluster.runtime_env(spec)["excludes"]
    create_package(str(repo), package, include_gitignore=False, excludes=excludes)
    uploaded = set(zipfile.ZipFile(package).namelist())
    assert set(keep) <= uploaded
    assert uploaded.isdisjoint(drop), uploaded & set(drop)


def test_the_uploaded_package_module_is_complete(spec, tmp_path):
    # The py_module upload gets the same excludes, relative to platform/mvtcae itself.
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "module.zip"
    module = cluster.REPO_ROOT / "platform" / "mvtcae"
    excludes = cluster.runtime_env(spec)["excludes"]
    create_package(str(module), package, include_gitignore=True, include_parent_dir=True,
                   excludes=excludes)  # fmt: skip
    uploaded = {n for n in zipfile.ZipFile(package).namelist() if n.endswith(".py")}
    expected = {
        str(p.relative_to(module.parent))
        for p in module.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert uploaded == expected


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], **kwargs)


def test_stop_process_tree_reaches_children_in_other_sessions(spec):
    # Like a Ray job driver: a grandchild in its own session, outside the leader's group.
    code = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
        " start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    record = cluster._spawn("tree", [sys.executable, "-c", code], os.environ.copy(), spec)
    log = Path(record["log"])
    deadline = time.monotonic() + 20
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(log.read_text().split()[0])
    assert cluster._proc_stat(grandchild)[1] != record["pid"]  # another process group
    stopped = cluster.stop_process_trees([record], grace_s=5)
    assert {record["pid"], grandchild} <= stopped
    for pid in (record["pid"], grandchild):
        assert cluster._proc_stat(pid) is None


def test_stop_process_tree_kills_what_ignores_sigterm(spec):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    record = cluster._spawn("stubborn", [sys.executable, "-c", code], os.environ.copy(), spec)
    time.sleep(0.5)
    started = time.monotonic()
    cluster.stop_process_trees([record], grace_s=1)
    assert cluster._proc_stat(record["pid"]) is None
    assert time.monotonic() - started < 10


def test_stop_process_tree_leaves_a_reused_pid_alone(spec):
    proc = _python("import time; time.sleep(300)")
    try:
        record = {"name": "old", "pid": proc.pid, "start_time": 1, "log": "-"}
        assert cluster.stop_process_trees([record]) == set()
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_strays_are_ray_like_processes_of_this_cluster_only(spec):
    spec.head_temp_dir.mkdir(parents=True, exist_ok=True)
    try:
        driver = _python("import time; time.sleep(300)", cwd=spec.head_temp_dir)
        log_reader = subprocess.Popen(["sleep", "300", str(spec.head_temp_dir)])
        time.sleep(0.3)
        found = cluster.strays(spec)
        assert driver.pid in found
        assert log_reader.pid not in found
    finally:
        for p in (driver, log_reader):
            p.kill()
            p.wait()
        spec.head_temp_dir.rmdir()
