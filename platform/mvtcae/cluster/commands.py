"""The command lines the cluster runs: ``ray start`` per node, ``mlflow server`` and
``ray job submit``, all with this interpreter's console scripts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mvtcae.cluster.environment import runtime_env
from mvtcae.cluster.spec import ClusterError, ClusterSpec

NODE_LABEL = "mvtcae-node"
"""The Ray label that holds a local cluster node's number (1: the head, 2: the first worker)."""


def console_script(name: str) -> str:
    """A console script of this interpreter's environment (.venv/bin/ray, .venv/bin/mlflow)."""
    return str(Path(sys.executable).parent / name)


def ray_start_argv(spec: ClusterSpec, index: int) -> list[str]:
    """``ray start --block`` for node ``index`` (0: the head)."""
    temp_dir = spec.temp_dir(index)
    argv = [
        console_script("ray"),
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
    # The node's number (1: the head) as a Ray label: how `drain_node` finds its Ray node id.
    argv.append(f"--labels={NODE_LABEL}={index + 1}")
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
        console_script("mlflow"),
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


def submit_argv(
    spec: ClusterSpec, entrypoint: list[str], submission_id: str | None = None, wait: bool = True
) -> list[str]:
    """``ray job submit --working-dir .`` of ``entrypoint`` to this cluster (run from the repo)."""
    if not entrypoint:
        raise ClusterError("no entrypoint: give the command after `--`, e.g. -- python jobs/x.py")
    argv = [
        console_script("ray"),
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
