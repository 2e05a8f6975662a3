"""A local multi-node Ray cluster with an MLflow server, stopped by PID, and job submission.

``make cluster-up`` starts a Ray head, one or more Ray worker nodes (``WORKER_NODES=N``) and
``mlflow server`` on this machine, each in its own process session, and records their PIDs in
``.cluster/state.json``;
``make cluster-down`` stops exactly those process trees (``ray stop`` would kill every Ray process
on the machine). Everything listens on 127.0.0.1 on non-default ports. Ray's token authentication
is on, with a token of this cluster's own in ``.cluster/auth_token``, and the MLflow server runs
MLflow's basic-auth app, with a generated admin password in ``.cluster/mlflow_credentials``: both
files are owner-only, and clients and jobs get their paths, never their content.

Run as ``mvtcae cluster {up,down,status,env,submit,kill-node,drain-node,start-node}`` (or
``python -m mvtcae.cli cluster ...``).
The modules, by concern: ``spec`` (state directory, ports, the checkout served), ``credentials``
(token and MLflow login), ``environment`` (what clients, the server and jobs see),
``commands`` (``ray start``, ``mlflow server``, ``ray job submit``), ``process_trees`` (starting
and stopping by PID), ``state`` (the state file), ``health`` (HTTP checks, busy ports) and
``control`` (up, down, submit, kill_node, drain_node, start_node).
"""

from mvtcae.cluster.commands import mlflow_server_argv, ray_start_argv, submit_argv
from mvtcae.cluster.control import (
    clear_stale,
    down,
    drain_node,
    kill_node,
    start_node,
    submit,
    up,
)
from mvtcae.cluster.credentials import (
    MLFLOW_ADMIN,
    ensure_mlflow_auth,
    ensure_token,
    mlflow_credentials,
    read_token,
)
from mvtcae.cluster.environment import client_env, client_exports, mlflow_server_env, runtime_env
from mvtcae.cluster.health import alive_nodes, busy_ports, http_get, mlflow_experiments_url
from mvtcae.cluster.process_trees import stop_process_trees, stop_strays, strays
from mvtcae.cluster.spec import (
    MAX_WORKER_NODES,
    PROJECT_DIR_ENV,
    WORKER_NODES_ENV,
    ClusterError,
    ClusterSpec,
    default_spec,
)
from mvtcae.cluster.state import recorded_processes, running_processes

__all__ = [
    "MAX_WORKER_NODES",
    "MLFLOW_ADMIN",
    "PROJECT_DIR_ENV",
    "WORKER_NODES_ENV",
    "ClusterError",
    "ClusterSpec",
    "alive_nodes",
    "busy_ports",
    "clear_stale",
    "client_env",
    "client_exports",
    "default_spec",
    "down",
    "ensure_mlflow_auth",
    "ensure_token",
    "http_get",
    "drain_node",
    "kill_node",
    "mlflow_credentials",
    "mlflow_experiments_url",
    "mlflow_server_argv",
    "mlflow_server_env",
    "ray_start_argv",
    "read_token",
    "recorded_processes",
    "running_processes",
    "runtime_env",
    "start_node",
    "stop_process_trees",
    "stop_strays",
    "strays",
    "submit",
    "submit_argv",
    "up",
]
