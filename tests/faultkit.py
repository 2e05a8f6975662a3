"""Driving real ``mvtcae`` commands through faults, for the fault tests on the shipped configs.

A `Command` is one ``mvtcae train|tune`` process in a session of its own (so that SIGINT to its
process group is what a terminal's Ctrl-C sends), with its Ray in a temporary directory of the
test's own. While it runs, a thread records every process below it; afterwards
`Command.leftovers` lists the recorded processes that still live and any process of its Ray temp
directory: a command that stopped cleanly leaves none.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mvtcae.storage import processes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
MVTCAE = [sys.executable, "-m", "mvtcae.cli"]
# The shipped configs' evaluation, shrunk in rows and epochs only: what it costs, not what it
# measures.
EVAL_SHRINK = [
    "eval.max_samples=200",
    "eval.nll_max_samples=20",
    "eval.classifier_epochs=2",
    "eval.probe_train_samples=400",
    "eval.probe_max_iter=50",
    "eval.projection_samples=100",
]
INHERITED_SETTINGS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "RAY_ADDRESS",
    "MVTCAE_DATA_DIR",
    "MVTCAE_STORAGE_PATH",
)
"""Settings another test may have left in this process's environment: a command here gets
everything it needs from its own options."""


def mlflow_client(uri: str) -> object:
    """A client of exactly this store, for tracking and the registry (the registry URI would
    otherwise be the process-wide one an earlier test set)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def ray_temp_dir() -> Iterator[Path]:
    """A short directory for Ray's sockets (a Unix socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mvr", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Command:
    """One command line, started in its own session and watched until it ends."""

    def __init__(self, argv: list[str], cwd: Path, log: Path, ray_tmp: Path) -> None:
        self.argv, self.log, self.ray_tmp = argv, log, ray_tmp
        env = {k: v for k, v in os.environ.items() if k not in INHERITED_SETTINGS}
        env.update(RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.recorded: set[processes.ProcessRef] = set()
        self._watch = threading.Thread(target=self._record, daemon=True)
        self._watch.start()

    def _record(self) -> None:
        root = processes.ref(self.proc.pid)
        while root is not None and processes.is_alive(root):
            self.recorded |= processes.tree(root) - {root}
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def last_line(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else ""

    def wait(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self._watch.join(timeout=5)
        return code

    def signal(self, sig: int, group: bool = False) -> None:
        """Send ``sig`` to the command (``group``: to its process group, as a terminal does)."""
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            os.kill(self.proc.pid, sig)

    def train_workers(self) -> list[int]:
        """PIDs of its live Ray Train workers."""
        found = []
        for pid, _ in processes.tree(processes.ref(self.proc.pid) or (0, 0)):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    found.append(pid)
        return sorted(found)

    def leftovers(self, settle_s: float = 15.0) -> list[str]:
        """What of the command still runs ``settle_s`` after it ended: recorded processes and
        those of its Ray temp directory (each as "pid command")."""
        deadline = time.monotonic() + settle_s
        while True:
            alive = {pid for pid, _ in self.recorded if processes.is_alive((pid, _))}
            alive |= {p for p in processes.all_pids() if processes.belongs_to(p, [self.ray_tmp])}
            alive.discard(os.getpid())
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return [f"{pid} {_cmdline(pid)}" for pid in sorted(alive)]

    def kill_all(self) -> None:
        """Clean-up after a failed test: SIGKILL whatever of it is left, by PID."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        left = {r for r in self.recorded if processes.is_alive(r)}
        left |= {
            r
            for p in processes.all_pids()
            if processes.belongs_to(p, [self.ray_tmp]) and (r := processes.ref(p))
        }
        processes.signal_all({pid for pid, _ in left}, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace")[:160]


def wait_for_checkpoint(
    run_root: Path,
    epoch: int,
    command: Command,
    timeout_s: float = 400,
    registered: bool = True,
    step: int = 0,
) -> Path:
    """The run directory once the checkpoint of the end of ``epoch`` (or, with ``step``, of
    that step inside it) is complete (its checksums written) and, with ``registered``, recorded
    in Ray Train's checkpoint snapshot (an epoch's: those inside epochs are not reported)."""
    name = f"checkpoint_epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if command.proc.poll() is not None:
            raise AssertionError(f"{command.argv} exited early:\n{command.output()}")
        # A run that skipped a corrupt checkpoint names its own with a suffix (epoch-xxxxxx).
        for done in run_root.glob(f"*/{name}*/checksums.json"):
            if done.parent.name != name and not done.parent.name.startswith(f"{name}-"):
                continue  # a checkpoint inside the epoch, not the one waited for
            run_dir = done.parent.parent
            snapshot = run_dir / "checkpoint_manager_snapshot.json"
            if not registered or step or (snapshot.is_file() and name in snapshot.read_text()):
                return run_dir
        time.sleep(0.05)
    raise AssertionError(f"no {name} after {timeout_s} s:\n{command.output()}")


CHECKPOINT_NAME = re.compile(r"^checkpoint_epoch_(\d+)(?:_step_(\d+))?(?:-[0-9a-f]+)?$")


def checkpoint_position(name: str) -> tuple[int, int]:
    """(epochs done, steps of the next epoch done) of a checkpoint directory's name."""
    match = CHECKPOINT_NAME.match(name)
    assert match, name
    epoch, step = int(match.group(1)), int(match.group(2) or 0)
    return (epoch - 1, step) if step else (epoch, 0)


def newest_intact_position(run_dir: Path) -> tuple[int, int]:
    """(epochs done, steps of the next epoch done) of the newest complete checkpoint on disk
    ((0, 0) when none is)."""
    positions = [
        checkpoint_position(p.parent.name)
        for p in run_dir.glob("checkpoint_epoch_*/checksums.json")
    ]
    return max(positions, default=(0, 0))


def newest_intact_epoch(run_dir: Path) -> int:
    """The epochs done at the newest checkpoint complete on disk (0 when none is)."""
    return newest_intact_position(run_dir)[0]
