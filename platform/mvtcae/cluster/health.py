"""Whether the cluster answers: authenticated HTTP GETs, the Ray nodes alive, the MLflow server's
basic auth, and the ports something already listens on."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request

from mvtcae.cluster.commands import NODE_LABEL
from mvtcae.cluster.credentials import mlflow_credentials
from mvtcae.cluster.spec import ClusterError, ClusterSpec


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


def ray_node_id(spec: ClusterSpec, token: str, node: int) -> str | None:
    """The Ray node id of the cluster's ALIVE node ``node`` (1: the head), from the dashboard's
    state API and the node's label (`NODE_LABEL`); None when no such node is alive."""
    status, body = http_get(f"{spec.dashboard_url}/api/v0/nodes?limit=100&detail=true", token)
    if status != 200:
        raise ClusterError(f"the dashboard answered {status} to a list of the cluster's nodes")
    for found in json.loads(body)["data"]["result"]["result"]:
        labels = found.get("labels") or {}
        if found.get("state") == "ALIVE" and labels.get(NODE_LABEL) == str(node):
            return str(found["node_id"])
    return None


def mlflow_experiments_url(spec: ClusterSpec) -> str:
    """A cheap authenticated read of the MLflow server's REST API."""
    return f"{spec.mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=1"


def check_mlflow_auth(spec: ClusterSpec) -> None:
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
