"""Processes by PID, read from /proc: trees, process groups, stopping them, and a watcher that
stops a process's Ray when that process dies.

A process is known by its PID *and* its start time, so that a PID the kernel has handed to a new
process is never signalled. Standard library only: the watcher runs this file as a script
(``python processes.py <driver pid> <root pid>...``) without importing the package.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ProcessRef = tuple[int, int]
"""(pid, start time in clock ticks since boot): one process, never a later one with its PID."""


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, start time in clock ticks), or None if ``pid`` has exited."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    # After the command name: state, ppid, pgrp, ... starttime is field 22 of the full line.
    if fields[0] in ("Z", "X"):
        return None  # Exited; only waiting for its parent to reap it.
    return int(fields[1]), int(fields[2]), int(fields[19])


def all_pids() -> list[int]:
    """Every PID on this machine."""
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def ref(pid: int) -> ProcessRef | None:
    """The process now running as ``pid``, or None."""
    stat = proc_stat(pid)
    return None if stat is None else (pid, stat[2])


def is_alive(process: ProcessRef) -> bool:
    """Whether that very process still runs (not another one with its PID)."""
    return ref(process[0]) == process


def children(parent: int) -> set[int]:
    """The direct children of ``parent``."""
    return {pid for pid in all_pids() if (s := proc_stat(pid)) is not None and s[0] == parent}


def descendants(*roots: int) -> set[int]:
    """Every process below ``roots`` (not the roots themselves)."""
    kids: dict[int, list[int]] = {}
    for pid in all_pids():
        stat = proc_stat(pid)
        if stat is not None:
            kids.setdefault(stat[0], []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in kids.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def group_members(pgid: int) -> set[int]:
    """The processes of process group ``pgid``."""
    return {pid for pid in all_pids() if (s := proc_stat(pid)) is not None and s[1] == pgid}


def belongs_to(pid: int, temp_dirs: list[Path]) -> bool:
    """Whether a process is a Ray process or job of a cluster with one of these temp dirs.

    Ray processes take the temp or session dir as an option; workers and job drivers run in a
    directory under it. Other processes that merely mention the path (`tail -f` of a log, a shell)
    are not matched.
    """
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    command = " ".join(args)
    for d in map(str, temp_dirs):
        if re.search(rf"--[\w-]+[= ]{re.escape(d)}(/|\s|$)", command):
            return True
        is_ray_python = args[0].startswith("ray::") or Path(args[0]).name.startswith("python")
        if is_ray_python and (cwd == d or cwd.startswith(d + "/")):
            return True
    return False


def signal_all(pids: set[int], sig: int) -> None:
    """Send ``sig`` to each PID that still exists."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def tree(*roots: ProcessRef) -> set[ProcessRef]:
    """The live processes among ``roots`` and everything below them."""
    alive = [r for r in roots if is_alive(r)]
    found = {r for pid in descendants(*(p for p, _ in alive)) if (r := ref(pid)) is not None}
    return found | set(alive)


def stop(processes: set[ProcessRef], grace_s: float = 5.0) -> set[ProcessRef]:
    """SIGTERM the live ones, SIGKILL what is left after ``grace_s``; return those signalled."""
    targets = {p for p in processes if is_alive(p)}
    if not targets:
        return set()
    signal_all({pid for pid, _ in targets}, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while (alive := {p for p in targets if is_alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    signal_all({pid for pid, _ in alive}, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while any(is_alive(p) for p in alive) and time.monotonic() < deadline:
        time.sleep(0.05)
    return targets


# --- the watcher: a process's Ray shares its fate --------------------------------------------


def start_watch(roots: set[ProcessRef]) -> subprocess.Popen:
    """Start a watcher that SIGKILLs ``roots`` and everything below them as soon as this process
    dies, however it dies (SIGKILL included).

    Ray kills the processes it starts itself when their parent dies, but not what those start:
    a SIGKILLed driver's training workers went on training and its agents lived on. The
    watcher runs in a session of its own, so that a terminal's Ctrl-C does not reach it.
    """
    me = ref(os.getpid())
    args = [str(p) for r in sorted(roots) for p in r]
    return subprocess.Popen(
        [sys.executable, "-S", __file__, str(me[0]), str(me[1]), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


def watch(driver: ProcessRef, roots: set[ProcessRef], interval_s: float = 0.5) -> None:
    """Follow the process tree of ``roots`` while ``driver`` lives; then SIGKILL all of it.

    The tree is recorded while it is whole: once a parent dies its children belong to init,
    and nothing links them to the driver any more.
    """
    recorded = set(roots)
    while is_alive(driver):
        recorded = {p for p in recorded if is_alive(p)}
        if not recorded:
            return  # Ray was shut down and nothing of it is left
        recorded |= tree(*recorded)
        time.sleep(interval_s)
    targets = tree(*recorded) | recorded
    signal_all({pid for pid, _ in targets if is_alive((pid, _))}, signal.SIGKILL)


def _main(argv: list[str]) -> None:
    numbers = [int(a) for a in argv]
    driver = (numbers[0], numbers[1])
    roots = {(numbers[i], numbers[i + 1]) for i in range(2, len(numbers), 2)}
    watch(driver, roots)


if __name__ == "__main__":
    _main(sys.argv[1:])
