"""The watcher that makes a driver's local Ray share its fate, on plain processes (no Ray): when
the driver dies, even by SIGKILL, the process tree it was told to watch is stopped by PID, those
reparented to init included; other processes are left alone."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from mvtcae.storage import processes

# A stand-in driver: starts a "raylet" whose child (a "worker") it does not know about, a
# bystander it was not told to watch, then the watcher for the raylet, and waits to be killed.
DRIVER = textwrap.dedent(
    """
    import subprocess, sys, time
    from mvtcae.storage import processes

    sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
    raylet = subprocess.Popen([sys.executable, "-c",
        "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(300)",
        *sleeper])
    bystander = subprocess.Popen(sleeper, start_new_session=True)
    watcher = processes.start_watch({processes.ref(raylet.pid)})
    print(raylet.pid, bystander.pid, watcher.pid, flush=True)
    time.sleep(300)
    """
)


def _wait_until(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_killed_drivers_watched_tree_is_stopped_and_nothing_else(tmp_path: Path) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    started: list[int] = []
    try:
        raylet, bystander, watcher = map(int, driver.stdout.readline().split())
        started += [raylet, bystander, watcher]
        assert _wait_until(lambda: len(processes.descendants(raylet)) == 1)
        (worker,) = processes.descendants(raylet)
        started.append(worker)
        tree = {processes.ref(p) for p in (raylet, worker)}
        time.sleep(1.0)  # the watcher records the tree while it is whole

        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
        assert _wait_until(lambda: not any(processes.is_alive(r) for r in tree)), "tree lived on"
        assert processes.proc_stat(bystander) is not None  # not the watcher's to stop
        assert _wait_until(lambda: processes.proc_stat(watcher) is None)  # it ends with its work
    finally:
        driver.kill()
        processes.signal_all({p for p in started if processes.proc_stat(p)}, signal.SIGKILL)


def test_stop_terms_then_kills_only_the_very_processes_given(tmp_path: Path) -> None:
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print(1, flush=True); time.sleep(300)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        stubborn.stdout.readline()  # its SIGTERM handler is set
        target = processes.ref(stubborn.pid)
        gone = (target[0], target[1] + 1)  # the same PID with another start time: not it
        assert processes.stop({gone}, grace_s=0.2) == set()
        assert processes.is_alive(target)
        started = time.monotonic()
        assert processes.stop({target}, grace_s=0.5) == {target}
        assert time.monotonic() - started < 5
        stubborn.wait(timeout=5)
        assert stubborn.returncode == -signal.SIGKILL
    finally:
        stubborn.kill()
