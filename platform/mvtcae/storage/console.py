"""What reaches the console, and the run's log file that keeps the rest.

The console of a command (and of every Ray process it starts: Train workers, Tune trials, tasks,
whose output Ray forwards to the driver) shows the platform's own lines (``mvtcae`` loggers),
and from Ray, MLflow and Optuna only warnings and errors. Their INFO lines (Ray Train's
``Reporting training result ...`` and ``Checkpoint successfully created ...``, MLflow's system
metrics monitor, ...) go to the run's log files, ``<run dir>/logs/<process>.log`` in run
storage, and reach the console too when ``MVTCAE_VERBOSE`` is on (``--verbose``).

The setting travels as the environment variable ``MVTCAE_VERBOSE``: the command sets it before
Ray starts, and `mvtcae.storage.ray_session` hands it to every process of the Ray job.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from mvtcae.config.locations import is_uri, join, resolve

VERBOSE_ENV = "MVTCAE_VERBOSE"
LOG_DIR = "logs"
"""The folder of a run's log files in its run directory (and in its MLflow run's artifacts)."""
THIRD_PARTY = ("", "ray", "ray.train", "ray.tune", "ray.data", "mlflow", "optuna")
"""Loggers whose own console handlers print INFO lines ("" is the root logger)."""
_FORMAT = "%(asctime)s %(levelname)s %(name)s [pid %(process)d] %(message)s"


def verbose() -> bool:
    """Whether the console shows Ray's, MLflow's and Optuna's INFO lines too."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def set_verbose(on: bool) -> None:
    """Set the console's verbosity for this process and the Ray processes it starts later
    (call it before Ray is imported). Quiet also turns off MLflow's artifact download bars
    (unless the environment sets them)."""
    os.environ[VERBOSE_ENV] = "1" if on else "0"
    # Ray folds lines that look alike (numbers aside) from several processes into one
    # "[repeated Nx across cluster]" line seconds later: never the platform's own lines, such
    # as the epoch lines of two concurrent sweep trials (read when Ray is imported).
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"\[mvtcae")
    if not on:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def ray_env_vars() -> dict[str, str]:
    """The environment entries that carry this setting to a Ray job's processes."""
    return {VERBOSE_ENV: "1" if verbose() else "0"}


class ConsoleFilter(logging.Filter):
    """On a console handler of Ray, MLflow or Optuna: warnings and errors always, INFO and
    below only when verbose (decided per record, so `set_verbose` applies at once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or verbose()


def _is_console(handler: logging.Handler) -> bool:
    """A handler that prints (not a file, nor an in-memory capture such as pytest's caplog)."""
    return (
        isinstance(handler, logging.StreamHandler)
        and not isinstance(handler, logging.FileHandler)
        and not isinstance(getattr(handler, "stream", None), io.StringIO)
    )


def quiet_console(names: tuple[str, ...] = THIRD_PARTY) -> None:
    """Put a `ConsoleFilter` on the console handlers the loggers ``names`` have now (once each).

    Call it after the libraries configured their loggers (``import ray``, ``import mlflow``,
    Ray Train's worker set-up); the platform's own ``mvtcae`` lines are never filtered."""
    for name in names:
        for handler in logging.getLogger(name).handlers:
            if _is_console(handler) and not any(
                isinstance(f, ConsoleFilter) for f in handler.filters
            ):
                handler.addFilter(ConsoleFilter())


def _reaches(logger: logging.Logger, handler: logging.Handler) -> bool:
    """Whether records of ``logger`` already reach ``handler`` (on it or an ancestor)."""
    current: logging.Logger | None = logger
    while current is not None:
        if handler in current.handlers:
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


class RunLog:
    """One process's log file of a run: ``<run_dir>/logs/<name>.log`` in run storage.

    It takes INFO and above from the platform and from Ray, MLflow and Optuna (whatever the
    console shows). A local run directory is appended to directly (a restarted worker goes on
    in the same file); in an object store the file is written in a local copy (seeded with what
    the store holds) and uploaded every ``sync_every_s`` seconds and when closed.
    """

    def __init__(self, run_dir: str, name: str, *, sync_every_s: float = 30.0) -> None:
        self.location = join(run_dir, LOG_DIR, f"{name}.log")
        self.remote = is_uri(run_dir)
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self._staging: str | None = None
        if self.remote:
            self._staging = tempfile.mkdtemp(prefix="mvtcae-log-")
            path = Path(self._staging) / f"{name}.log"
            _download(self.location, path)
        else:
            path = Path(self.location)
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handler = _LogFileHandler(path, self)
        self.handler.setLevel(logging.INFO)
        self.handler.setFormatter(logging.Formatter(_FORMAT))
        self._attached: list[logging.Logger] = []

    def attach(self, names: tuple[str, ...] = ("mvtcae", *THIRD_PARTY)) -> RunLog:
        """Take the records of the loggers ``names`` (each record written once)."""
        for name in ("", *names):
            logger = logging.getLogger(name)
            if not _reaches(logger, self.handler):
                logger.addHandler(self.handler)
                self._attached.append(logger)
        return self

    def sync(self, force: bool = False) -> None:
        """Upload the local copy to the object store (at most every ``sync_every_s``)."""
        if not self.remote or (
            not force and time.monotonic() - self._last_sync < self.sync_every_s
        ):
            return
        self.handler.flush()
        fs, path = resolve(self.location)
        fs.create_dir(path.rpartition("/")[0], recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(self.path.read_bytes())
        self._last_sync = time.monotonic()

    def close(self) -> None:
        """Detach, close and (object store) upload the file; never raises."""
        for logger in self._attached:
            logger.removeHandler(self.handler)
        self._attached.clear()
        self.handler.close()
        try:
            self.sync(force=True)
        except Exception as err:  # noqa: BLE001 - a log file must not fail the run
            logging.getLogger(__name__).warning(
                "could not write the log file %s: %s: %s", self.location, type(err).__name__, err
            )
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)

    def __enter__(self) -> RunLog:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LogFileHandler(logging.FileHandler):
    def __init__(self, path: Path, owner: RunLog) -> None:
        super().__init__(path, mode="a", encoding="utf-8")
        self.owner = owner

    def emit(self, record: logging.LogRecord) -> None:
        super().emit(record)
        if self.owner.remote:
            with contextlib.suppress(Exception):  # retried at the next record and on close
                self.owner.sync()


def _download(location: str, path: Path) -> None:
    """The file at ``location`` into ``path`` (an empty file when there is none yet)."""
    fs, remote = resolve(location)
    try:
        with fs.open_input_stream(remote) as src:
            path.write_bytes(src.read())
    except (FileNotFoundError, OSError):
        path.write_bytes(b"")
