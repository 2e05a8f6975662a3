"""The one place that connects to Ray or starts a local Ray for a training run or a sweep, and
checks that the local paths a multi-node run needs are shared by every node."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import socket
import threading
import uuid

from mvtcae.config.locations import local_path
from mvtcae.model.errors import UserError
from mvtcae.storage import console, processes

logger = logging.getLogger(__name__)
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
_started_here: str | None = None
"""The GCS address of the local Ray this process started, if it started one."""
_local_ray: set[processes.ProcessRef] = set()
"""The processes ``ray.init`` started for that local Ray (its GCS, raylet, dashboard, ...)."""
_connected_here = False
"""Whether `ensure_ray` connected this process to Ray (rather than the caller)."""


def ensure_ray(address: str | None, local_cpus: int) -> None:
    """Connect to the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local Ray with
    ``local_cpus`` logical CPUs; nothing when Ray is already initialised in this process."""
    import ray
    import ray.data

    global _connected_here
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    handlers = _python_signal_handlers()
    console.quiet_console()  # Ray's INFO lines go to the run's log (storage.console)
    if address:
        # The console setting reaches the job's processes (a job's own variables are merged).
        verbose_env = {} if not console.verbose() else console.ray_env_vars()
        runtime_env = {"env_vars": verbose_env} if verbose_env else None
        context = ray.init(address=address, runtime_env=runtime_env)
        _remember_dashboard(getattr(context, "dashboard_url", None))
    else:
        start_local_ray(local_cpus)
    _connected_here = True
    _restore_signal_handlers(handlers)
    if _dashboard:
        logger.info("Ray dashboard: %s", _dashboard)
    # The per-epoch lines are the progress display of a run; Ray Data's operator bars would
    # interleave with them in the driver's output.
    ray.data.DataContext.get_current().enable_progress_bars = False


LOCAL_HEADROOM_CPUS = 2
"""Logical CPUs a local Ray has beyond the machine's cores: room for Ray Data's read tasks and an
evaluation task beside training workers that take every core (short, and waiting on I/O)."""


def machine_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_gpus() -> int:
    """The CUDA GPUs this process sees."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def local_cpus() -> int:
    """Logical CPUs for a local Ray: sized to the machine, whatever a run asks for."""
    return machine_cpus() + LOCAL_HEADROOM_CPUS


class CapacityError(UserError):
    """A run asks for more CPUs or GPUs than the machine (or the cluster) has."""


def check_resources(
    asked: dict[str, float],
    what: dict[str, str],
    address: str | None,
    local_num_cpus: int | None = None,
) -> None:
    """Refuse, before any worker is started, a request that cannot fit.

    ``asked``: resources by name (``{"CPU": 64, "GPU": 0}``); ``what``: for each, the settings
    that asked for it, as the message shows them. On this machine's own local Ray (``address``
    None, no ``RAY_ADDRESS``), what exists is the machine's cores (``local_num_cpus`` when the
    user sized the local Ray) and GPUs: CapacityError. On a cluster it only connects to, the
    cluster's present total is compared and a shortfall is a warning: an autoscaler may add
    nodes, and Ray waits for them.
    """
    import ray

    local = not (address or os.environ.get("RAY_ADDRESS")) and (
        not ray.is_initialized() or started_here()
    )
    if local:
        have = {"CPU": float(local_num_cpus or machine_cpus()), "GPU": float(machine_gpus())}
        where = "this machine" + (" (train.local_num_cpus)" if local_num_cpus else "")
    elif ray.is_initialized():
        have = {k: float(v) for k, v in ray.cluster_resources().items()}
        where = "the Ray cluster now"
    else:
        return  # checked once connected
    short = [
        f"{what.get(name, name)} = {amount:g} {name}s; {where} has {have.get(name, 0.0):g}"
        for name, amount in asked.items()
        if amount > have.get(name, 0.0) + 1e-9
    ]
    if not short:
        return
    message = "the run asks for more than exists: " + "; ".join(short)
    if not local:
        logger.warning("%s (waiting for the cluster to grow)", message)
        return
    raise CapacityError(
        message + ". Lower train.num_workers or train.resources_per_worker, set "
        "train.use_gpu: false on a machine without GPUs, or run on a cluster "
        "(train.ray_address, RAY_ADDRESS)"
    )


def start_local_ray(num_cpus: int) -> str:
    """Start a local Ray whose workers know its dashboard address; return that address.

    Train V2's placement-group cleaner looks the cluster up by address; with another Ray
    instance on the same host the lookup fails and stopped trials leak their placement groups.
    """
    import ray

    port = _dashboard_port(int(os.environ.get("MVTCAE_DASHBOARD_PORT", "8265")))
    before = processes.children(os.getpid())
    ray.init(
        num_cpus=num_cpus,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={
            "env_vars": {
                "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                # The dashboard's Train tab shows runs only when Train records its state.
                "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                # Train's preemption watcher (one more actor process per run, seconds of start-up
                # on a small machine) follows node drains, which a one-machine Ray never has.
                PREEMPTION_WATCHER_ENV: os.environ.get(PREEMPTION_WATCHER_ENV, "0"),
                **console.ray_env_vars(),
            }
        },
    )
    _remember_dashboard(f"http://127.0.0.1:{port}")
    global _started_here, _local_ray
    _started_here = ray.get_runtime_context().gcs_address
    # What ray.init started: this process's new children and, later, everything below them.
    started = processes.children(os.getpid()) - before
    _local_ray = {r for pid in started if (r := processes.ref(pid)) is not None}
    if _local_ray:
        processes.start_watch(_local_ray)
    return f"http://127.0.0.1:{port}"


_dashboard: str | None = None


def _remember_dashboard(url: str | None) -> None:
    global _dashboard
    if url and not url.startswith(("http://", "https://")):
        url = f"http://{url}"
    _dashboard = url or None


def dashboard_url() -> str | None:
    """The Ray dashboard of the session `ensure_ray` opened (None when unknown)."""
    return _dashboard


def _python_signal_handlers() -> dict[int, object]:
    """The Python handlers of SIGINT and SIGTERM now (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict[int, object]) -> None:
    """Put back the Python handlers that ``ray.init`` replaced.

    In a driver, ``ray.init`` sets its own SIGTERM handler (``sys.exit(15)``) and its core
    worker a native one that prints a stack trace: a ``kill`` or ``ray job stop`` then ends the
    process before it can stop its run and record it KILLED. Where Python code had set a
    handler (the command line does), it wins again; a process that had none keeps Ray's.
    """
    for sig, handler in handlers.items():
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, handler)


def local_ray_processes() -> set[processes.ProcessRef]:
    """The live processes of the local Ray this process started (empty when it started none)."""
    return processes.tree(*_local_ray) if _local_ray else set()


def shutdown(grace_s: float = 5.0) -> None:
    """Disconnect from Ray; when this process started the local Ray, stop every process of it,
    by PID, those its raylet started included (``ray.shutdown`` leaves agents behind).

    On a cluster this process only connected to, disconnecting ends the run's actors: Ray
    kills the actors a driver owns when it leaves, and a Train run's controller (which owns
    the workers) is one.
    """
    import ray

    global _started_here, _local_ray, _connected_here
    local = local_ray_processes()
    if ray.is_initialized():
        ray.shutdown()
    stopped = processes.stop(local, grace_s)
    if stopped:
        logger.debug("stopped %d processes of the local Ray", len(stopped))
    _started_here, _local_ray, _connected_here = None, set(), False


def connected_here() -> bool:
    """Whether `ensure_ray` started or connected this process's Ray session (not its caller)."""
    import ray

    return _connected_here and ray.is_initialized()


def started_here() -> bool:
    """Whether the Ray this process is connected to is the local one it started
    (`start_local_ray`): then the whole cluster is this machine, and no other job uses it."""
    import ray

    return (
        _started_here is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _started_here
    )


def preemption_watched() -> bool:
    """Whether Ray Train tells this session's runs about node drains: everywhere but on the
    one-machine Ray that `start_local_ray` started without its preemption watcher (the default
    there, since such a Ray has no node to drain)."""
    if not started_here():
        return True
    return os.environ.get(PREEMPTION_WATCHER_ENV, "0") != "0"


def _dashboard_port(preferred: int) -> int:
    """``preferred`` when it is free on 127.0.0.1, else a free port."""
    for candidate in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return sock.getsockname()[1]
    raise RuntimeError("no free TCP port on 127.0.0.1 for the Ray dashboard")


class NodeLocalPathError(UserError, RuntimeError):
    """A local path that a multi-node cluster needs on every node is not the same on every node."""


def _read_digest(path: str) -> str | None:
    """SHA-256 of a file as this node sees it (None: not readable here)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError:
        return None


def nodes_missing_files(files: list[tuple[str, str]]) -> dict[str, list[str]]:
    """For each ``(path, sha256)``: the Ray nodes (by IP) that cannot read that file with that
    content. Empty on a single-node cluster. One zero-CPU task per node, pinned to it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = _alive_nodes()
    if len(nodes) < 2:
        return {}
    probe = ray.remote(num_cpus=0, max_retries=0)(_read_many)
    answers = {
        n["NodeManagerAddress"] + f" ({n['NodeID'][:8]})": probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote([path for path, _ in files])
        for n in nodes
    }
    missing: dict[str, list[str]] = {}
    for node, ref in answers.items():
        for (path, expected), seen in zip(files, ray.get(ref), strict=True):
            if seen != expected:
                missing.setdefault(path, []).append(node)
    return missing


def largest_node_cpus(with_gpu: bool = False) -> int:
    """The most CPUs one alive node has (among nodes with a GPU when ``with_gpu``): the most a
    single task can ask for and still be scheduled; 1 when no node qualifies."""
    counts = [
        int(n.get("Resources", {}).get("CPU", 0))
        for n in _alive_nodes()
        if not with_gpu or n.get("Resources", {}).get("GPU", 0) >= 1
    ]
    return max([1, *counts])


def _alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _read_many(paths: list[str]) -> list[str | None]:
    return [_read_digest(p) for p in paths]


def check_shared_paths(paths: dict[str, str], marker_dir: dict[str, str]) -> None:
    """Refuse, before any work starts, local paths that not every node of a multi-node cluster
    sees alike.

    ``paths`` maps an option (``data.dir``) to a file that must read the same everywhere (the
    dataset's manifest); ``marker_dir`` maps an option (``train.storage_path``) to a directory
    into which a marker file is written here and looked for on every node. URIs are skipped:
    object stores are shared by construction (``file://`` is checked like a path).
    """
    if len(_alive_nodes()) < 2:
        return  # one node sees its own files
    checks: list[tuple[str, str, str]] = []
    written: list[str] = []
    try:
        for option, location in marker_dir.items():
            directory = local_path(location)
            if directory is None:
                continue
            marker = os.path.join(directory, f".mvtcae-shared-check-{uuid.uuid4().hex}")
            os.makedirs(directory, exist_ok=True)
            with open(marker, "w") as handle:
                handle.write(marker)
            written.append(marker)
            checks.append((option, marker, _read_digest(marker) or ""))
        for option, location in paths.items():
            path = local_path(location)
            if path is not None:
                checks.append((option, path, _read_digest(path) or ""))
        missing = nodes_missing_files([(path, digest) for _, path, digest in checks])
    finally:
        for marker in written:
            with contextlib.suppress(OSError):
                os.remove(marker)
    problems = [
        f"{option}: {path} does not read the same on node(s) {', '.join(missing[path])}"
        for option, path, _ in checks
        if path in missing
    ]
    if problems:
        raise NodeLocalPathError(
            "this Ray cluster has several nodes, and a local path the run needs on every node "
            "is node-local: " + "; ".join(problems) + ". Use a filesystem every node mounts at "
            "the same path, or a URI (s3://bucket/prefix, gs://bucket/prefix) for "
            "train.storage_path; copy or mount the dataset at the same path on every node."
        )
