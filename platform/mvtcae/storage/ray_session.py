"""The one place that connects to Ray or starts a local Ray for a training run or a sweep."""

from __future__ import annotations

import logging
import math
import os
import socket

logger = logging.getLogger(__name__)


def ensure_ray(address: str | None, local_cpus: int) -> None:
    """Connect to the cluster at ``address`` (else ``RAY_ADDRESS``), or start a local Ray with
    ``local_cpus`` logical CPUs; nothing when Ray is already initialised in this process."""
    import ray
    import ray.data

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        start_local_ray(local_cpus)
    # The per-epoch lines are the progress display of a run; Ray Data's operator bars would
    # interleave with them in the driver's output.
    ray.data.DataContext.get_current().enable_progress_bars = False


def local_cpus(workers: int, cpus_per_worker: float, concurrent_runs: int = 1) -> int:
    """Logical CPUs for a local Ray: every worker of every concurrent run, plus room for Ray
    Data's read tasks and an evaluation task (at least the machine's cores)."""
    needed = math.ceil(concurrent_runs * workers * cpus_per_worker) + 2
    return max(os.cpu_count() or 1, needed)


def start_local_ray(num_cpus: int) -> None:
    """Start a local Ray whose workers know its dashboard address.

    Train V2's placement-group cleaner looks the cluster up by address; with another Ray
    instance on the same host the lookup fails and stopped trials leak their placement groups.
    """
    import ray

    port = _dashboard_port(int(os.environ.get("MVTCAE_DASHBOARD_PORT", "8265")))
    ray.init(
        num_cpus=num_cpus,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )
    logger.info("Ray dashboard: http://127.0.0.1:%d", port)


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
