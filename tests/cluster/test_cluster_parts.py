"""The local cluster's parts that need no running cluster: ports, environment, token and MLflow
credentials, what a submitted job uploads, stopping process trees by PID and clearing what an
earlier cluster left behind (with real, short-lived processes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from unittest import mock

import pytest

from mvtcae import cluster
from mvtcae.cluster.process_trees import is_running, spawn
from mvtcae.cluster.state import save_state
from mvtcae.storage.processes import proc_stat
from mvtcae.tracking import auth as mlflow_auth

REPO = Path(__file__).resolve().parents[2]


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


def test_more_worker_nodes_keep_their_ports_and_temp_dirs_apart(spec):
    """`up --worker-nodes 3`: four nodes' ports distinct and inside a 500-port block, a temp dir
    each; a `down` told of fewer nodes still searches every recorded node's temp dir."""
    import dataclasses

    from mvtcae.cluster.control import as_recorded

    four = dataclasses.replace(spec, worker_nodes=3)
    ports = four.all_ports()
    assert len(ports) == len(set(ports)) and max(ports) < four.port_base + 500
    dirs = four.temp_dirs
    assert dirs[:2] == [spec.head_temp_dir, spec.node_temp_dir] and len(set(dirs)) == 4
    assert f"--temp-dir={dirs[3]}" in cluster.ray_start_argv(four, 3)
    assert all(len(str(d)) <= 40 for d in dirs)  # Ray's socket paths
    recorded = {
        "processes": [
            {"name": n} for n in ("mlflow", "ray-head", "ray-node2", "ray-node3", "ray-node4")
        ]
    }
    assert as_recorded(spec, recorded).temp_dirs == dirs
    for bad in (0, cluster.MAX_WORKER_NODES + 1):
        with pytest.raises(cluster.ClusterError, match="worker nodes"):
            dataclasses.replace(spec, worker_nodes=bad)
    with (
        mock.patch.dict(os.environ, {cluster.WORKER_NODES_ENV: "two"}),
        pytest.raises(cluster.ClusterError, match="MVTCAE_CLUSTER_WORKER_NODES: expected a whole"),
    ):
        cluster.default_spec()


def test_kill_node_and_start_node_name_what_is_wrong(spec):
    """The drill commands refuse an unknown node, a dead node to kill or drain and a live node
    to start, naming the node; `start-node` keeps the dead node's logs and replaces its record
    by the new process."""
    spec.state_dir.mkdir(parents=True)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = {"name": "ray-node2", "pid": sleeper.pid, "start_time": proc_stat(sleeper.pid)[2]}
        dead = {
            "name": "ray-node3",
            "pid": 999999,
            "start_time": 1,
            "log": "x",
            "argv": [sys.executable, "-c", "import time; time.sleep(60)"],
        }
        save_state(spec, [alive, dead])
        with pytest.raises(cluster.ClusterError, match="no worker node 4 .*2, 3"):
            cluster.kill_node(spec, 4)
        with pytest.raises(cluster.ClusterError, match="worker node 3 is not running"):
            cluster.kill_node(spec, 3)
        with pytest.raises(cluster.ClusterError, match="no worker node 4 .*2, 3"):
            cluster.drain_node(spec, 4, deadline_s=5)
        with pytest.raises(cluster.ClusterError, match="worker node 3 is not running"):
            cluster.drain_node(spec, 3, deadline_s=5)
        with pytest.raises(cluster.ClusterError, match="worker node 2 is running"):
            cluster.start_node(spec, 2)
        assert sleeper.pid in cluster.kill_node(spec, 2)
        assert sleeper.wait(timeout=10) == -9
        # The dead node's temp dir (its workers' logs) moves into the cluster's log dir, so that
        # Ray does not send those logs to the jobs a second time when the node joins again.
        old_logs = spec.temp_dir(2) / "session_latest" / "logs"
        old_logs.mkdir(parents=True)
        (old_logs / "worker.out").write_text("epoch 1/40\n")
        record = cluster.start_node(spec, 3)
        assert not spec.temp_dir(2).exists()
        (kept,) = spec.log_dir.glob("ray-node3-lost-*")
        assert (kept / "session_latest" / "logs" / "worker.out").read_text() == "epoch 1/40\n"
        try:
            assert [r["name"] for r in cluster.recorded_processes(spec)] == [
                "ray-node2",
                "ray-node3",
            ]
            assert cluster.recorded_processes(spec)[1]["pid"] == record["pid"] != 999999
            assert [r["pid"] for r in cluster.running_processes(spec)] == [record["pid"]]
        finally:
            cluster.stop_process_trees([record], grace_s=1)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_ray_start_commands_keep_nodes_apart_and_dashboard_local(spec):
    head, node = cluster.ray_start_argv(spec, 0), cluster.ray_start_argv(spec, 1)
    assert "--head" in head and "--dashboard-host=127.0.0.1" in head
    assert f"--temp-dir={spec.head_temp_dir}" in head
    assert f"--temp-dir={spec.node_temp_dir}" in node
    assert f"--address={spec.gcs_address}" in node and "--head" not in node
    assert "--block" in head and "--block" in node
    # Each node's number as a Ray label: how `drain-node` finds the node Ray knows.
    assert "--labels=mvtcae-node=1" in head and "--labels=mvtcae-node=2" in node
    server = cluster.mlflow_server_argv(spec)
    assert server[server.index("--host") + 1] == "127.0.0.1"
    assert server[server.index("--backend-store-uri") + 1].startswith("sqlite:///")


def test_client_env_uses_this_clusters_token_only(spec):
    foreign = {
        "PATH": "/usr/bin",
        "RAY_ADDRESS": "ray://elsewhere:10001",
        "RAY_AUTH_TOKEN": "someone-elses",
        "MLFLOW_TRACKING_USERNAME": "someone",
        "MLFLOW_TRACKING_PASSWORD": "someone-elses",
        "MLFLOW_AUTH_ADMIN_PASSWORD": "another-servers",
        "HOME": "/root",
    }
    env = cluster.client_env(spec, base=foreign)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] == str(spec.token_path)
    assert "RAY_ADDRESS" not in env and "RAY_AUTH_TOKEN" not in env
    # MLflow: this cluster's server and the path of its credentials, nobody else's login.
    assert env["MLFLOW_TRACKING_URI"] == spec.mlflow_uri
    assert env["MVTCAE_MLFLOW_CREDENTIALS_FILE"] == str(spec.mlflow_credentials_path)
    assert not {k for k in env if k.startswith(("MLFLOW_TRACKING_USER", "MLFLOW_TRACKING_PASS"))}
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in env
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


def test_mlflow_auth_files_are_private_consistent_and_kept(spec):
    cluster.ensure_mlflow_auth(spec)
    files = [
        spec.mlflow_credentials_path,
        spec.mlflow_auth_config_path,
        spec.mlflow_server_env_path,
    ]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    username, password = cluster.mlflow_credentials(spec)
    assert username == "admin" and len(password) >= 24
    # The server's config reads back (as MLflow reads it) with the same admin and password.
    with mock.patch.dict(
        os.environ, {"MLFLOW_AUTH_CONFIG_PATH": str(spec.mlflow_auth_config_path)}
    ):
        os.environ.pop("MLFLOW_AUTH_ADMIN_USERNAME", None)
        os.environ.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
        from mlflow.server.auth.config import read_auth_config

        config = read_auth_config()
    assert (config.admin_username, config.admin_password) == (username, password)
    assert config.database_uri == f"sqlite:///{spec.mlflow_auth_db}"
    assert config.default_permission == "NO_PERMISSIONS"
    assert spec.mlflow_server_env_path.read_text().startswith("MLFLOW_FLASK_SERVER_SECRET_KEY=")
    before = [path.read_text() for path in files]
    cluster.ensure_mlflow_auth(spec)
    assert [path.read_text() for path in files] == before


def test_a_user_store_without_its_credentials_is_not_given_new_ones(spec):
    spec.mlflow_dir.mkdir(parents=True)
    spec.mlflow_auth_db.write_bytes(b"")
    with pytest.raises(cluster.ClusterError, match="restore the credentials file"):
        cluster.ensure_mlflow_auth(spec)
    assert not spec.mlflow_credentials_path.exists()


def test_mlflow_server_runs_the_basic_auth_app_with_its_secrets_from_files(spec):
    argv = cluster.mlflow_server_argv(spec)
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    assert argv[argv.index("--env-file") + 1] == str(spec.mlflow_server_env_path)
    env = cluster.mlflow_server_env(spec)
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(spec.mlflow_auth_config_path)
    # Only the server reads its auth config.
    assert "MLFLOW_AUTH_CONFIG_PATH" not in cluster.client_env(spec)


def test_env_command_prints_paths_never_secrets(spec, capsys):
    cluster.ensure_token(spec)
    cluster.ensure_mlflow_auth(spec)
    _, password = cluster.mlflow_credentials(spec)
    overrides = {
        "MVTCAE_CLUSTER_DIR": str(spec.state_dir),
        "MVTCAE_CLUSTER_PORT_BASE": str(spec.port_base),
        "MVTCAE_CLUSTER_DASHBOARD_PORT": str(spec.dashboard_port),
        "MVTCAE_CLUSTER_MLFLOW_PORT": str(spec.mlflow_port),
    }
    from click.testing import CliRunner

    from mvtcae.cli import main

    with mock.patch.dict(os.environ, overrides):
        result = CliRunner().invoke(main, ["cluster", "env"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"export MVTCAE_MLFLOW_CREDENTIALS_FILE={spec.mlflow_credentials_path}" in out
    assert f"export MLFLOW_TRACKING_URI={spec.mlflow_uri}" in out
    secrets_shown = [s for s in (password, cluster.read_token(spec)) if s in out]
    assert secrets_shown == []


def _credentials_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(0o600)
    return path


@pytest.fixture
def clean_mlflow_env():
    """os.environ without MLflow credentials; the whole environment is restored afterwards."""
    with mock.patch.dict(os.environ):
        for key in (
            mlflow_auth.CREDENTIALS_FILE_ENV,
            mlflow_auth.USERNAME_ENV,
            mlflow_auth.PASSWORD_ENV,
        ):
            os.environ.pop(key, None)
        yield


def test_credentials_file_sets_mlflows_variables(tmp_path, clean_mlflow_env):
    path = _credentials_file(tmp_path, mlflow_auth.format_credentials("admin", "s3cr%t-pw"))
    mlflow_auth.apply_credentials_file()  # no file named: nothing to do
    assert mlflow_auth.USERNAME_ENV not in os.environ
    os.environ[mlflow_auth.CREDENTIALS_FILE_ENV] = str(path)
    mlflow_auth.apply_credentials_file()
    assert os.environ[mlflow_auth.USERNAME_ENV] == "admin"
    assert os.environ[mlflow_auth.PASSWORD_ENV] == "s3cr%t-pw"
    # What MLflow sends with each request.
    from mlflow.utils.credentials import read_mlflow_creds

    assert tuple(read_mlflow_creds()) == ("admin", "s3cr%t-pw")


def test_explicit_mlflow_credentials_win_over_the_file(tmp_path, clean_mlflow_env):
    path = _credentials_file(tmp_path, mlflow_auth.format_credentials("admin", "from-file"))
    os.environ[mlflow_auth.CREDENTIALS_FILE_ENV] = str(path)
    os.environ[mlflow_auth.USERNAME_ENV] = "alice"
    os.environ[mlflow_auth.PASSWORD_ENV] = "alices-password"
    mlflow_auth.apply_credentials_file()
    assert os.environ[mlflow_auth.PASSWORD_ENV] == "alices-password"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (None, "cannot read"),
        ("mlflow_tracking_password = hunter2-hunter2\n", "not an INI file"),
        ("[other]\nmlflow_tracking_password = hunter2-hunter2\n", r"no \[mlflow\] section"),
        ("[mlflow]\nmlflow_tracking_password = hunter2-hunter2\n", "mlflow_tracking_username"),
    ],
    ids=["missing", "no-section-header", "other-section", "no-username"],
)
def test_a_bad_credentials_file_is_named_and_its_password_is_not(
    tmp_path, clean_mlflow_env, text, problem
):
    path = tmp_path / "credentials"
    if text is not None:
        _credentials_file(tmp_path, text)
    os.environ[mlflow_auth.CREDENTIALS_FILE_ENV] = str(path)
    with pytest.raises(mlflow_auth.CredentialsFileError, match=problem) as caught:
        mlflow_auth.apply_credentials_file()
    assert str(path) in str(caught.value)
    assert "hunter2" not in str(caught.value)
    # Nor in a traceback: a parser error, which may quote the line, is not chained.
    error = caught.value
    assert error.__cause__ is None and (error.__context__ is None or error.__suppress_context__)
    assert mlflow_auth.PASSWORD_ENV not in os.environ


def test_resolving_the_tracking_uri_applies_the_credentials_file(tmp_path, clean_mlflow_env):
    from mvtcae.tracking import resolve_tracking_uri

    path = _credentials_file(tmp_path, mlflow_auth.format_credentials("admin", "pw-123456789012"))
    os.environ[mlflow_auth.CREDENTIALS_FILE_ENV] = str(path)
    os.environ["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:5055"
    assert resolve_tracking_uri() == "http://127.0.0.1:5055"
    assert os.environ[mlflow_auth.PASSWORD_ENV] == "pw-123456789012"


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
    # The credentials' path, never the password: Ray shows env_vars in the dashboard.
    assert env["MVTCAE_MLFLOW_CREDENTIALS_FILE"] == str(spec.mlflow_credentials_path)
    assert not any("PASSWORD" in key for key in env)
    # Every worker process loads them from that file before it takes work.
    hook = cluster.runtime_env(spec)["worker_process_setup_hook"]
    assert hook == "mvtcae.tracking.auth.apply_credentials_file"


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
        ".cluster/mlflow_credentials",
        ".cluster/mlflow_auth.ini",
        ".cluster/mlflow_server.env",
        "platform/mvtcae/__pycache__/x.pyc",
    ]
    for name in keep + drop:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text("x")
    shutil.copy(REPO / ".rayignore", repo / ".rayignore")
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
    module = REPO / "platform" / "mvtcae"
    excludes = cluster.runtime_env(spec)["excludes"]
    create_package(
        str(module), package, include_gitignore=True, include_parent_dir=True, excludes=excludes
    )
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
    record = spawn("tree", [sys.executable, "-c", code], os.environ.copy(), spec)
    log = Path(record["log"])
    deadline = time.monotonic() + 20
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    grandchild = int(log.read_text().split()[0])
    assert proc_stat(grandchild)[1] != record["pid"]  # another process group
    stopped = cluster.stop_process_trees([record], grace_s=5)
    assert {record["pid"], grandchild} <= stopped
    for pid in (record["pid"], grandchild):
        assert proc_stat(pid) is None


def test_stop_process_tree_kills_what_ignores_sigterm(spec):
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)"
    record = spawn("stubborn", [sys.executable, "-c", code], os.environ.copy(), spec)
    time.sleep(0.5)
    started = time.monotonic()
    cluster.stop_process_trees([record], grace_s=1)
    assert proc_stat(record["pid"]) is None
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


# --- what an earlier cluster left behind -------------------------------------------------------


def _record_as_cluster(spec, records) -> None:
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    save_state(spec, records)


def _wait_for_line(path: Path, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    return path.read_text().strip()


def _leader_leaving_a_child_behind(spec) -> tuple[dict, int]:
    """A recorded session leader that exits at once, leaving a child in its process group (as a
    Ray head killed by the OOM killer leaves its GCS); returns (record, child pid)."""
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
        "print(p.pid, flush=True)\n"
    )
    record = spawn("ray-head", [sys.executable, "-c", code], os.environ.copy(), spec)
    child = int(_wait_for_line(Path(record["log"])))
    deadline = time.monotonic() + 20
    while proc_stat(record["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc_stat(record["pid"]) is None
    assert proc_stat(child)[1] == record["pid"]  # still in the dead leader's group
    return record, child


def _stray(spec) -> subprocess.Popen:
    """A process of this cluster nobody recorded: it names the head's temp dir as Ray does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(300)", f"--temp-dir={spec.head_temp_dir}"],
        start_new_session=True,
    )
    deadline = time.monotonic() + 10
    while proc.pid not in cluster.strays(spec) and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc


def test_up_refuses_while_a_recorded_process_still_runs(spec):
    code = "import time; time.sleep(300)"
    record = spawn("mlflow", [sys.executable, "-c", code], os.environ.copy(), spec)
    try:
        _record_as_cluster(spec, [record])
        for attempt in (cluster.clear_stale, cluster.up):
            with pytest.raises(cluster.ClusterError) as caught:
                attempt(spec)
            assert f"pid {record['pid']}" in str(caught.value)
            assert "make cluster-down" in str(caught.value)
        assert is_running(record)  # left alone, and its state with it
        assert json.loads(spec.state_file.read_text())["processes"][0]["pid"] == record["pid"]
    finally:
        cluster.stop_process_trees([record], grace_s=2)


def test_stale_state_and_strays_are_cleared_by_pid(spec, caplog):
    record, child = _leader_leaving_a_child_behind(spec)
    stray = _stray(spec)
    try:
        _record_as_cluster(spec, [record])
        with caplog.at_level(logging.INFO, logger="mvtcae.cluster"):
            stopped = cluster.clear_stale(spec)
        assert {child, stray.pid} <= set(stopped)
        assert stray.wait(timeout=10) is not None
        assert proc_stat(child) is None
        assert cluster.strays(spec) == []
        assert not spec.state_file.exists()
        assert "earlier cluster" in caplog.text and str(stray.pid) in caplog.text
        assert cluster.clear_stale(spec) == []  # nothing left to do
    finally:
        for pid in (child, stray.pid):
            if proc_stat(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        stray.wait()


def test_up_clears_what_an_earlier_cluster_left_before_anything_else(spec):
    # The busy port stops `up` right after the clean-up, before it starts a cluster.
    record, child = _leader_leaving_a_child_behind(spec)
    stray = _stray(spec)
    try:
        _record_as_cluster(spec, [record])
        with socket.socket() as s:
            s.bind(("127.0.0.1", spec.mlflow_port))
            s.listen()
            with pytest.raises(cluster.ClusterError, match="ports already in use"):
                cluster.up(spec)
        assert stray.wait(timeout=10) is not None
        assert proc_stat(child) is None
        assert not spec.state_file.exists()
    finally:
        for pid in (child, stray.pid):
            if proc_stat(pid) is not None:
                os.kill(pid, signal.SIGKILL)
        stray.wait()
