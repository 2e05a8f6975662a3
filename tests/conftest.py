"""Settings of every test run: a SIGTERM interrupts pytest as Ctrl-C does.

Fixtures here start real processes (Ray clusters, MLflow and S3 servers) and stop them, by PID,
in their finalizers. On Ctrl-C (SIGINT, a KeyboardInterrupt) pytest stops the run and still runs
the finalizers of every fixture that was set up, module- and session-scoped ones included. A
SIGTERM (a CI job cancelled, `timeout`, `kill`) would end the process without them and leave the
processes running, so it is turned into the same KeyboardInterrupt.

`ray.init` installs its own SIGTERM handler (a ``sys.exit``, which pytest reports as one failed
test and carries on), so the handler is installed again before each phase of each test.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from types import FrameType

import pytest

_interrupted = False
_previous_handler = pytest.StashKey[object]()
_cache_dir = pytest.StashKey[str]()


def _sigterm_as_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    """Interrupt the run on the first SIGTERM; let the finalizers it started finish."""
    global _interrupted
    if _interrupted:
        # Another SIGTERM must not cut short the teardown the first one began (SIGKILL still
        # ends everything at once).
        print("SIGTERM again: still stopping what the tests started", file=sys.stderr, flush=True)
        return
    _interrupted = True
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM)")


def _install() -> None:
    if signal.getsignal(signal.SIGTERM) is not _sigterm_as_keyboard_interrupt:
        signal.signal(signal.SIGTERM, _sigterm_as_keyboard_interrupt)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_previous_handler] = signal.getsignal(signal.SIGTERM)
    _install()
    # Caches (validation records, coherence classifiers) of this run only, not the user's
    # ~/.cache; set before any Ray starts, so workers inherit it.
    if "MVTCAE_CACHE_DIR" not in os.environ:
        config.stash[_cache_dir] = tempfile.mkdtemp(prefix="mvtcae-test-cache-")
        os.environ["MVTCAE_CACHE_DIR"] = config.stash[_cache_dir]


def pytest_unconfigure(config: pytest.Config) -> None:
    # None: a handler not installed from Python, which cannot be put back; the default then.
    previous = config.stash.get(_previous_handler, None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
    if _cache_dir in config.stash:
        shutil.rmtree(config.stash[_cache_dir], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    _install()


@pytest.fixture(scope="module")
def own_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """A Ray session the test module opens itself, as a notebook would (``ray.init``), and the
    platform joins: a new local instance with ``RAY_CPUS`` logical CPUs (a module constant, 4 by
    default), Ray's forwarding of worker output off."""
    import ray

    ray.init(
        address="local",
        num_cpus=getattr(request.module, "RAY_CPUS", 4),
        include_dashboard=True,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def platform_ray(request: pytest.FixtureRequest) -> Iterator[None]:
    """The local Ray the platform starts for itself (`start_local_ray`: the dashboard address for
    Train's cleaner, the fate watcher), ``RAY_CPUS`` logical CPUs (4 by default)."""
    import ray

    from mvtcae.storage.ray_session import start_local_ray

    start_local_ray(num_cpus=getattr(request.module, "RAY_CPUS", 4))
    yield
    ray.shutdown()
