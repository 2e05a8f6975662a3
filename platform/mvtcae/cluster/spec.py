"""Where the local cluster keeps its state, which ports it uses, and the checkout it serves."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mvtcae.model.errors import UserError

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


MAX_WORKER_NODES = 8  # ten ports per node from +10 stay below the worker ports at +100
WORKER_NODES_ENV = "MVTCAE_CLUSTER_WORKER_NODES"


class ClusterError(UserError, RuntimeError):
    """The local cluster cannot start, be reached or be stopped; the message says what to do."""


@dataclass(frozen=True)
class ClusterSpec:
    """Where the local cluster keeps its state and which ports it uses (all on 127.0.0.1).

    Ports come from one block starting at ``port_base``: GCS, Ray client and the autoscaler's
    and dashboard's metrics (+0, +1, +6, +7), ten per node from +10 (node manager, object
    manager, agents, metrics), then 100 worker ports per node from +100. ``worker_nodes``
    Ray nodes join the head (1 to `MAX_WORKER_NODES`); the first keeps its temp dir in
    ``node_temp_dir``, the k-th node of the cluster (k >= 3) in ``<node_temp_dir>-<k>``.
    """

    state_dir: Path
    head_temp_dir: Path
    node_temp_dir: Path
    port_base: int = 16400
    dashboard_port: int = 18265
    mlflow_port: int = 5055
    cpus_per_node: int = 2
    object_store_bytes: int = 512 * 1024**2
    worker_nodes: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.worker_nodes <= MAX_WORKER_NODES:
            raise ClusterError(
                f"worker nodes: 1 to {MAX_WORKER_NODES} join the head, not {self.worker_nodes}"
            )

    def temp_dir(self, index: int) -> Path:
        """Ray's temp dir of node ``index`` (0: the head)."""
        if index == 0:
            return self.head_temp_dir
        return self.node_temp_dir if index == 1 else Path(f"{self.node_temp_dir}-{index + 1}")

    @property
    def temp_dirs(self) -> list[Path]:
        """The temp dirs of every node of this cluster, head first."""
        return [self.temp_dir(i) for i in range(self.worker_nodes + 1)]

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
        for i in range(self.worker_nodes + 1):
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
        worker_nodes=_count(env(WORKER_NODES_ENV) or "1", WORKER_NODES_ENV),
    )


def _count(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ClusterError(f"{name}: expected a whole number, got {text!r}") from None
