"""``mvtcae cluster``: a local Ray cluster with an MLflow server, for trying ``ray job submit``.

``up`` starts a Ray head, one or more Ray worker nodes (``--worker-nodes``) and an MLflow server
(basic auth) on 127.0.0.1;
``down`` stops exactly what ``up`` started, by PID; ``status`` and ``env`` show it; ``submit``
runs ``ray job submit --working-dir .`` against it; ``kill-node`` and ``start-node`` take a
worker node away with no notice and bring it back (node-loss drills). See `mvtcae.cluster`.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click

from mvtcae import cluster


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C, once: a second one must not cut short the cleanup the first began."""
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def _log_to_stderr() -> None:
    """Show the cluster module's log messages (what `up` cleaned, ...) on the command line."""
    log = logging.getLogger(cluster.__name__)
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


@contextmanager
def _cluster_errors() -> Iterator[None]:
    """A ClusterError as click's one-line error (exit 1)."""
    try:
        yield
    except cluster.ClusterError as err:
        raise click.ClickException(str(err)) from None


def _spec() -> cluster.ClusterSpec:
    with _cluster_errors():
        return cluster.default_spec()


@click.group("cluster")
def cluster_command() -> None:
    """A local Ray cluster (head + second node) and an MLflow server, all on 127.0.0.1."""
    _log_to_stderr()


@cluster_command.command("up")
@click.option(
    "--worker-nodes",
    type=click.IntRange(1, cluster.MAX_WORKER_NODES),
    default=None,
    help=f"Ray nodes that join the head (default ${cluster.WORKER_NODES_ENV}, else 1): a "
    "multi-node cluster on one host, for elastic training and node-loss drills",
)
def up_command(worker_nodes: int | None) -> None:
    """Start the Ray head, its worker nodes and the MLflow server."""
    spec = _spec()
    if worker_nodes is not None:
        spec = dataclasses.replace(spec, worker_nodes=worker_nodes)
    # Terminated half-way, `up` stops what it started, as on Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with _cluster_errors():
            state = cluster.up(spec)
    except KeyboardInterrupt:
        click.echo("interrupted; stopped what it had started", err=True)
        sys.exit(130)
    click.echo(f"Ray dashboard and job API: {state['dashboard_url']} (token: {spec.token_path})")
    click.echo(f"MLflow server: {state['mlflow_uri']}   checkpoints: {state['storage_path']}")
    click.echo(f"MLflow login: {cluster.MLFLOW_ADMIN}, password in {spec.mlflow_credentials_path}")
    click.echo("Submit with `make submit-train`; stop with `make cluster-down`.")


@cluster_command.command("down")
def down_command() -> None:
    """Stop exactly what `up` started, by PID."""
    with _cluster_errors():
        stopped = cluster.down(_spec())
    click.echo(f"stopped {len(stopped)} processes" if stopped else "nothing was running")


@cluster_command.command("status")
def status_command() -> None:
    """Show the running cluster."""
    spec = _spec()
    records = cluster.running_processes(spec)
    if not records:
        click.echo(f"no local cluster running from {spec.state_dir}")
        sys.exit(1)
    recorded = cluster.recorded_processes(spec)
    for r in recorded:
        state = "" if r in records else "  (exited)"
        click.echo(f"{r['name']:<10} pid {r['pid']:<8} log {r['log']}{state}")
    started = sum(1 for r in recorded if r["name"].startswith("ray-"))
    alive = cluster.alive_nodes(spec, cluster.read_token(spec))
    click.echo(f"Ray nodes alive: {alive} of {started} started")
    click.echo(f"dashboard / job API: {spec.dashboard_url}   MLflow: {spec.mlflow_uri}")
    click.echo(f"MLflow login: {cluster.MLFLOW_ADMIN}, password in {spec.mlflow_credentials_path}")
    click.echo(f"checkpoint storage: {spec.storage_dir}")


@cluster_command.command("kill-node")
@click.argument("node", type=click.IntRange(2, cluster.MAX_WORKER_NODES + 1))
def kill_node_command(node: int) -> None:
    """SIGKILL worker NODE (2: the first after the head) with no notice, as a lost machine:
    its `ray start`, raylet and workers, by PID. A drill: see `start-node`."""
    with _cluster_errors():
        pids = cluster.kill_node(_spec(), node)
    click.echo(f"killed worker node {node}: {len(pids)} processes")


@cluster_command.command("drain-node")
@click.argument("node", type=click.IntRange(2, cluster.MAX_WORKER_NODES + 1))
@click.option(
    "--deadline-s",
    type=click.IntRange(1, 3600),
    default=30,
    show_default=True,
    help="seconds from the notice to the node's end",
)
@click.option(
    "--kill/--no-kill",
    default=True,
    show_default=True,
    help="SIGKILL the node at the deadline, as the cloud would (Ray does not)",
)
def drain_node_command(node: int, deadline_s: int, kill: bool) -> None:
    """Preempt worker NODE as a cloud reclaims a spot VM: Ray is told it is drained for
    preemption with DEADLINE-S seconds left (runs checkpoint on the notice), then the node is
    SIGKILLed at the deadline. A drill: see `start-node`."""
    with _cluster_errors():
        pids = cluster.drain_node(_spec(), node, deadline_s, kill_at_deadline=kill)
    what = f"killed at the deadline: {len(pids)} processes" if kill else "left running"
    click.echo(f"drained worker node {node} for preemption ({deadline_s} s); {what}")


@cluster_command.command("start-node")
@click.argument("node", type=click.IntRange(2, cluster.MAX_WORKER_NODES + 1))
def start_node_command(node: int) -> None:
    """Start worker NODE again with the command `up` started it with."""
    with _cluster_errors():
        record = cluster.start_node(_spec(), node)
    click.echo(f"started worker node {node}: pid {record['pid']}")


@cluster_command.command("env")
def env_command() -> None:
    """Print shell exports for `ray job` and MLflow clients: addresses and the paths of the
    token and credentials files, never their content."""
    spec = _spec()
    for key, value in cluster.client_exports(spec).items():
        click.echo(f"export {key}={shlex.quote(value)}")


@cluster_command.command(
    "submit", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False}
)
@click.option("--submission-id", default=None)
@click.option("--no-wait", is_flag=True)
@click.argument("entrypoint", nargs=-1, type=click.UNPROCESSED)
def submit_command(submission_id: str | None, no_wait: bool, entrypoint: tuple[str, ...]) -> None:
    """ray job submit --working-dir . -- ENTRYPOINT..."""
    args = list(entrypoint)
    args = args[1:] if args[:1] == ["--"] else args
    spec = _spec()
    with _cluster_errors():
        # The command line is part of what the user asked for: show it as ray's own CLI would.
        click.echo("+ " + shlex.join(cluster.submit_argv(spec, args, submission_id, not no_wait)))
        code = cluster.submit(spec, args, submission_id, wait=not no_wait)
    sys.exit(code)
