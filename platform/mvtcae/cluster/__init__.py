"""A local multi-node Ray cluster with an MLflow server, stopped by PID, and job submission.

``make cluster-up`` starts a Ray head, a second Ray node and ``mlflow server`` on this machine,
each in its own process session, and records their PIDs in ``.cluster/state.json``;
``make cluster-down`` stops exactly those process trees (``ray stop`` would kill every Ray process
on the machine). Everything listens on 127.0.0.1 on non-default ports. Ray's token authentication
is on, with a token of this cluster's own in ``.cluster/auth_token``, and the MLflow server runs
MLflow's basic-auth app, with a generated admin password in ``.cluster/mlflow_credentials``: both
files are owner-only, and clients and jobs get their paths, never their content.

Run as ``mvtcae cluster {up,down,status,env,submit}`` (or ``python -m mvtcae.cli cluster ...``).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mvtcae.model.errors import UserError
from mvtcae.storage.processes import (
    all_pids,
    belongs_to,
    descendants,
    group_members,
    proc_stat,
    signal_all,
)
from mvtcae.tracking import auth as mlflow_auth

RUNTIME_ENV = Path("infra", "local", "runtime_env.yaml")
PROJECT_DIR_ENV = "MVTCAE_PROJECT_DIR"


def project_dir() -> Path:
    """The project checkout the cluster serves: ``$MVTCAE_PROJECT_DIR``, else the nearest
    directory at or above the working directory that holds ``infra/local/runtime_env.yaml``
    (jobs are submitted with ``--working-dir`` of that checkout)."""
    configured = os.environ.get(PROJECT_DIR_ENV)
    if configured:
        return Path(configured).resolve()
    here = Path.cwd().resolve()
    for candidate in (here, *here.parents):
        if (candidate / RUNTIME_ENV).is_file():
            return candidate
    raise ClusterError(
        f"no {RUNTIME_ENV} at or above {here}: run the cluster commands from the project "
        f"checkout, or set {PROJECT_DIR_ENV}"
    )


# Client-side settings that would point Ray at another cluster or another token.
_FOREIGN_RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")
# ... and MLflow settings that would log in as someone else or configure another auth server.
_FOREIGN_MLFLOW_ENV = (
    mlflow_auth.USERNAME_ENV,
    mlflow_auth.PASSWORD_ENV,
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_AUTH_CONFIG_PATH",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
MLFLOW_ADMIN = "admin"

_log = logging.getLogger(__name__)


class ClusterError(UserError, RuntimeError):
    """The local cluster cannot start, be reached or be stopped; the message says what to do."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where the local cluster keeps its state and which ports it uses (all on 127.0.0.1).

    Ports come from one block starting at ``port_base``: GCS, Ray client and the autoscaler's
    and dashboard's metrics (+0, +1, +6, +7), ten per node from +10 (node manager, object
    manager, agents, metrics), then 100 worker ports per node from +100.
    """

    state_dir: Path
    head_temp_dir: Path
    node_temp_dir: Path
    port_base: int = 16400
    dashboard_port: int = 18265
    mlflow_port: int = 5055
    cpus_per_node: int = 2
    object_store_bytes: int = 512 * 1024**2

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.port_base}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def token_path(self) -> Path:
        return self.state_dir / "auth_token"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def mlflow_credentials_path(self) -> Path:
        """Clients' MLflow username and password (owner-only; ~/.mlflow/credentials format)."""
        return self.state_dir / "mlflow_credentials"

    @property
    def mlflow_auth_config_path(self) -> Path:
        """The MLflow server's basic-auth config (MLFLOW_AUTH_CONFIG_PATH; owner-only)."""
        return self.state_dir / "mlflow_auth.ini"

    @property
    def mlflow_server_env_path(self) -> Path:
        """Secrets only the MLflow server reads, as a dotenv file (``mlflow --env-file``)."""
        return self.state_dir / "mlflow_server.env"

    @property
    def mlflow_auth_db(self) -> Path:
        """The basic-auth app's user store (users, password hashes, permissions)."""
        return self.mlflow_dir / "basic_auth.db"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def storage_dir(self) -> Path:
        """Checkpoint storage every node reaches (one host: a shared directory)."""
        return self.state_dir / "storage"

    @property
    def mlflow_dir(self) -> Path:
        return self.state_dir / "mlflow"

    def node_ports(self, index: int) -> dict[str, int]:
        """The ``ray start`` port options of node ``index`` (0: head)."""
        base = self.port_base + 10 * (index + 1)
        workers = self.port_base + 100 * (index + 1)
        return {
            "node-manager-port": base,
            "object-manager-port": base + 1,
            "dashboard-agent-listen-port": base + 2,
            "dashboard-agent-grpc-port": base + 3,
            "runtime-env-agent-port": base + 4,
            "metrics-export-port": base + 5,
            "min-worker-port": workers,
            "max-worker-port": workers + 99,
        }

    def all_ports(self) -> list[int]:
        fixed = [self.port_base + i for i in (0, 1, 6, 7)] + [self.dashboard_port, self.mlflow_port]
        ranged = []
        for i in (0, 1):
            p = self.node_ports(i)
            ranged += [v for k, v in p.items() if not k.endswith("worker-port")]
            ranged += range(p["min-worker-port"], p["max-worker-port"] + 1)
        return fixed + ranged


def default_spec() -> ClusterSpec:
    """The spec ``make cluster-*`` uses; MVTCAE_CLUSTER_* environment variables override it."""
    env = os.environ.get
    return ClusterSpec(
        state_dir=Path(env("MVTCAE_CLUSTER_DIR") or project_dir() / ".cluster").resolve(),
        head_temp_dir=Path(env("MVTCAE_CLUSTER_HEAD_TMP", "/tmp/mvtcae-ray-head")),
        node_temp_dir=Path(env("MVTCAE_CLUSTER_NODE_TMP", "/tmp/mvtcae-ray-node2")),
        port_base=int(env("MVTCAE_CLUSTER_PORT_BASE", "16400")),
        dashboard_port=int(env("MVTCAE_CLUSTER_DASHBOARD_PORT", "18265")),
        mlflow_port=int(env("MVTCAE_CLUSTER_MLFLOW_PORT", "5055")),
    )


# --- environment and token ---------------------------------------------------------------------


def client_env(spec: ClusterSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes and clients of this cluster: token auth with its token,
    its MLflow server and the path (only) of its MLflow credentials file."""
    env = dict(os.environ if base is None else base)
    for key in _FOREIGN_RAY_ENV + _FOREIGN_MLFLOW_ENV:
        env.pop(key, None)
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(spec.token_path),
        RAY_USAGE_STATS_ENABLED="0",
        # Jobs find the tracking server and shared storage even when submitted by hand.
        MLFLOW_TRACKING_URI=spec.mlflow_uri,
        MVTCAE_MLFLOW_CREDENTIALS_FILE=str(spec.mlflow_credentials_path),
        MVTCAE_STORAGE_PATH=str(spec.storage_dir),
        # Ray's own metrics exporters default to fixed ports shared by every local cluster.
        AUTOSCALER_METRIC_PORT=str(spec.port_base + 6),
        DASHBOARD_METRIC_PORT=str(spec.port_base + 7),
        # Ray's state API (Train V2's placement-group cleaner uses it inside workers) otherwise
        # auto-detects the cluster by scanning the host, and fails when others run Ray here too.
        RAY_API_SERVER_ADDRESS=spec.dashboard_url,
        # A job's `python ...` entrypoint must find this environment's interpreter.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
    )
    return env


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` owner-only (0600) with ``text``; fails if it exists (O_EXCL)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_token(spec: ClusterSpec) -> None:
    """Create this cluster's auth token (owner-only file) unless it exists."""
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    if not spec.token_path.exists():
        _write_private(spec.token_path, secrets.token_hex(32))


def ensure_mlflow_auth(spec: ClusterSpec) -> None:
    """Create, unless they exist, the MLflow admin credentials and the server's auth files.

    The credentials file is the source of truth: MLflow creates the admin user from the config's
    password on its first start only, so the password is generated once and kept with the user
    store. Every file is owner-only; nothing here prints or logs the password.
    """
    spec.state_dir.mkdir(parents=True, exist_ok=True)
    spec.mlflow_dir.mkdir(parents=True, exist_ok=True)
    if not spec.mlflow_credentials_path.exists():
        if spec.mlflow_auth_db.exists():
            raise ClusterError(
                f"{spec.mlflow_credentials_path} is missing but the MLflow user store "
                f"{spec.mlflow_auth_db} exists, with the admin password it was created with: "
                f"restore the credentials file, or delete {spec.mlflow_auth_db} (it holds only "
                "MLflow users and permissions) to create a new admin password"
            )
        password = secrets.token_urlsafe(24)
        _write_private(
            spec.mlflow_credentials_path, mlflow_auth.format_credentials(MLFLOW_ADMIN, password)
        )
    try:
        username, password = mlflow_auth.read_credentials(spec.mlflow_credentials_path)
    except mlflow_auth.CredentialsFileError as e:
        raise ClusterError(str(e)) from None
    if not spec.mlflow_auth_config_path.exists():
        _write_private(
            spec.mlflow_auth_config_path,
            "[mlflow]\n"
            # Only the admin exists; an account an admin adds later sees what it is granted.
            "default_permission = NO_PERMISSIONS\n"
            f"database_uri = sqlite:///{spec.mlflow_auth_db}\n"
            f"admin_username = {username}\n"
            f"admin_password = {password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Spares a PBKDF2 hash per request; with one server worker a password changed
            # through the API takes effect at once.
            "auth_cache_ttl_seconds = 300\n",
        )
    if not spec.mlflow_server_env_path.exists():
        # The basic-auth app signs its CSRF tokens with a static key.
        _write_private(
            spec.mlflow_server_env_path, f"MLFLOW_FLASK_SERVER_SECRET_KEY={secrets.token_hex(32)}\n"
        )


def mlflow_credentials(spec: ClusterSpec) -> tuple[str, str]:
    """(username, password) of this cluster's MLflow server."""
    try:
        return mlflow_auth.read_credentials(spec.mlflow_credentials_path)
    except mlflow_auth.CredentialsFileError as e:
        raise ClusterError(f"{e}: run `make cluster-up` first") from None


def read_token(spec: ClusterSpec) -> str:
    try:
        return spec.token_path.read_text().strip()
    except FileNotFoundError:
        raise ClusterError(f"no token at {spec.token_path}: run `make cluster-up` first") from None


# --- processes, by PID -------------------------------------------------------------------------


def strays(spec: ClusterSpec) -> list[int]:
    """Processes that still belong to this cluster (by its temp dirs), if any."""
    dirs = [spec.head_temp_dir, spec.node_temp_dir]
    me = os.getpid()
    return sorted(p for p in all_pids() if p != me and belongs_to(p, dirs))


def _spawn(name: str, argv: list[str], env: dict[str, str], spec: ClusterSpec) -> dict[str, Any]:
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


def _is_same_process(record: dict[str, Any]) -> bool:
    stat = proc_stat(record["pid"])
    return stat is not None and stat[2] == record["start_time"]


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
    leaders = [r["pid"] for r in records if _is_same_process(r)]
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


# --- state -------------------------------------------------------------------------------------


def _load_state(spec: ClusterSpec) -> dict[str, Any] | None:
    """The recorded state; None without a state file, no processes if the file is unreadable."""
    try:
        return json.loads(spec.state_file.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        _log.warning("%s is not valid JSON; its processes are unknown", spec.state_file)
        return {}


def _save_state(spec: ClusterSpec, processes: list[dict[str, Any]]) -> None:
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


def running_processes(spec: ClusterSpec) -> list[dict[str, Any]]:
    state = _load_state(spec)
    return [p for p in (state or {}).get("processes", []) if _is_same_process(p)]


def clear_stale(spec: ClusterSpec) -> list[int]:
    """Make way for `up`; return the PIDs it stopped.

    Refuses (ClusterError) while a process recorded by an earlier `up` still runs: that cluster
    may be in use, and only `make cluster-down` stops it. Otherwise stops, by PID, what an
    earlier cluster left behind (members of its recorded process groups, processes in its temp
    dirs) and removes its state file.
    """
    state = _load_state(spec)
    records = (state or {}).get("processes", [])
    if alive := [r for r in records if _is_same_process(r)]:
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


# --- HTTP checks -------------------------------------------------------------------------------


def http_get(
    url: str,
    token: str | None = None,
    timeout: float = 5.0,
    basic_auth: tuple[str, str] | None = None,
) -> tuple[int, bytes]:
    """(status, body) of a GET, with a bearer token or a (username, password); a refused
    connection is status 0."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if basic_auth is not None:
        pair = base64.b64encode(":".join(basic_auth).encode()).decode()
        request.add_header("Authorization", f"Basic {pair}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


def alive_nodes(spec: ClusterSpec, token: str) -> int:
    """Number of ALIVE Ray nodes, from the dashboard's state API."""
    status, body = http_get(f"{spec.dashboard_url}/api/v0/nodes?limit=100", token)
    if status != 200:
        return 0
    nodes = json.loads(body)["data"]["result"]["result"]
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def _wait(
    what: str, check: Callable[[], bool], timeout_s: float, records: list[dict[str, Any]]
) -> None:
    """Poll ``check`` until true; fail early, with the log's tail, if a started process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        for record in records:
            if not _is_same_process(record):
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


# --- up / down ---------------------------------------------------------------------------------


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (.venv/bin/ray, .venv/bin/mlflow)."""
    return str(Path(sys.executable).parent / name)


def ray_start_argv(spec: ClusterSpec, index: int) -> list[str]:
    """``ray start --block`` for node ``index`` (0: the head)."""
    temp_dir = spec.head_temp_dir if index == 0 else spec.node_temp_dir
    argv = [
        _bin("ray"),
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp_dir}",
        f"--num-cpus={spec.cpus_per_node}",
        "--num-gpus=0",
        f"--object-store-memory={spec.object_store_bytes}",
        "--disable-usage-stats",
    ]
    argv += [f"--{k}={v}" for k, v in spec.node_ports(index).items()]
    if index == 0:
        argv += [
            "--head",
            f"--port={spec.port_base}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={spec.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={spec.port_base + 1}",
        ]
    else:
        argv += [f"--address={spec.gcs_address}"]
    return argv


def mlflow_server_argv(spec: ClusterSpec) -> list[str]:
    """``mlflow server`` on 127.0.0.1 with basic auth: SQLite backend, artifacts proxied by the
    server, its secret key read from an owner-only file (not from the command line)."""
    return [
        _bin("mlflow"),
        "--env-file",
        str(spec.mlflow_server_env_path),
        "server",
        "--app-name",
        "basic-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(spec.mlflow_port),
        "--backend-store-uri",
        f"sqlite:///{spec.mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination",
        str(spec.mlflow_dir / "artifacts"),
        "--serve-artifacts",
        "--workers",
        "1",
    ]


def mlflow_server_env(spec: ClusterSpec) -> dict[str, str]:
    """The MLflow server's environment: the clients' one plus its basic-auth config's path."""
    return {**client_env(spec), "MLFLOW_AUTH_CONFIG_PATH": str(spec.mlflow_auth_config_path)}


def mlflow_experiments_url(spec: ClusterSpec) -> str:
    """A cheap authenticated read of the MLflow server's REST API."""
    return f"{spec.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"


def _check_mlflow_auth(spec: ClusterSpec) -> None:
    """The server must refuse a request without credentials and accept this cluster's."""
    url = mlflow_experiments_url(spec)
    if (status := http_get(url)[0]) != 401:
        raise ClusterError(f"the MLflow server answered {status}, not 401, without credentials")
    if (status := http_get(url, basic_auth=mlflow_credentials(spec))[0]) != 200:
        raise ClusterError(
            f"the MLflow server answered {status} to the credentials in "
            f"{spec.mlflow_credentials_path}: its user store {spec.mlflow_auth_db} holds another "
            f"admin password; restore that file, or delete {spec.mlflow_auth_db}"
        )


def busy_ports(ports: list[int]) -> list[int]:
    """The ports in ``ports`` that something already listens on (127.0.0.1 or any address)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As servers do: a port held only by closed connections (TIME_WAIT) is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def up(spec: ClusterSpec, timeout_s: float = 180.0) -> dict[str, Any]:
    """Start head, second node and MLflow server; return the state. Stops all of it on failure.

    A cluster from an earlier `up` that still runs is refused; what one left behind is stopped
    first (`clear_stale`).
    """
    for path in (spec.head_temp_dir, spec.node_temp_dir):
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
        records.append(_spawn(name, argv, process_env, spec))
        _save_state(spec, records)

    try:
        start("mlflow", mlflow_server_argv(spec), mlflow_server_env(spec))
        start("ray-head", ray_start_argv(spec, 0), env)
        _wait("the Ray head", lambda: alive_nodes(spec, token) >= 1, timeout_s, records)
        start("ray-node2", ray_start_argv(spec, 1), env)
        _wait("the second Ray node", lambda: alive_nodes(spec, token) >= 2, timeout_s, records)
        _wait(
            "the MLflow server",
            lambda: http_get(f"{spec.mlflow_uri}/health")[0] == 200,
            timeout_s,
            records,
        )
        _check_mlflow_auth(spec)
    except BaseException:
        down(spec)
        raise
    return _load_state(spec) or {}


def down(spec: ClusterSpec) -> list[int]:
    """Stop the recorded processes and anything left that runs in this cluster's temp dirs."""
    state = _load_state(spec)
    stopped = stop_process_trees((state or {}).get("processes", []))
    # Processes re-parented away from the recorded trees (a detached job driver) still name
    # this cluster's temp dirs in their command line or working directory.
    try:
        stopped |= stop_strays(spec)
    finally:
        spec.state_file.unlink(missing_ok=True)
    return sorted(stopped)


# --- job submission ----------------------------------------------------------------------------


def runtime_env(spec: ClusterSpec) -> dict[str, Any]:
    """The submitted job's runtime env: infra/local/runtime_env.yaml plus this cluster's URIs
    and the path of its MLflow credentials file (Ray shows env_vars in the dashboard: never the
    password itself; the YAML's setup hook reads the file in every worker)."""
    env = yaml.safe_load((project_dir() / RUNTIME_ENV).read_text())
    env.setdefault("env_vars", {}).update(
        MLFLOW_TRACKING_URI=spec.mlflow_uri,
        MVTCAE_MLFLOW_CREDENTIALS_FILE=str(spec.mlflow_credentials_path),
        MVTCAE_STORAGE_PATH=str(spec.storage_dir),
    )
    return env


def submit_argv(
    spec: ClusterSpec, entrypoint: list[str], submission_id: str | None = None, wait: bool = True
) -> list[str]:
    """``ray job submit --working-dir .`` of ``entrypoint`` to this cluster (run from the repo)."""
    if not entrypoint:
        raise ClusterError("no entrypoint: give the command after `--`, e.g. -- python jobs/x.py")
    argv = [
        _bin("ray"),
        "job",
        "submit",
        f"--address={spec.dashboard_url}",
        "--working-dir=.",
        f"--runtime-env-json={json.dumps(runtime_env(spec))}",
    ]
    if submission_id:
        argv.append(f"--submission-id={submission_id}")
    if not wait:
        argv.append("--no-wait")
    return [*argv, "--", *entrypoint]


def submit(
    spec: ClusterSpec, entrypoint: list[str], submission_id: str | None = None, wait: bool = True
) -> int:
    """Submit a job to the running local cluster; the exit status of ``ray job submit``."""
    if not running_processes(spec):
        raise ClusterError(f"no local cluster running from {spec.state_dir}: `make cluster-up`")
    argv = submit_argv(spec, entrypoint, submission_id, wait)
    _log.debug("+ %s", shlex.join(argv))
    return subprocess.run(argv, cwd=project_dir(), env=client_env(spec)).returncode


def client_exports(spec: ClusterSpec) -> dict[str, str]:
    """The variables that point `ray job ...` and MLflow clients at this cluster (paths of the
    token and credentials files, never their content)."""
    return {
        "RAY_ADDRESS": spec.dashboard_url,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(spec.token_path),
        "MLFLOW_TRACKING_URI": spec.mlflow_uri,
        mlflow_auth.CREDENTIALS_FILE_ENV: str(spec.mlflow_credentials_path),
    }
