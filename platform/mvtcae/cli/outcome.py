"""How a command ends when it cannot finish: one line for the user, the processes it started
stopped, an exit status a script can test.

- A `UserError` (bad data, a path that holds no dataset, nothing to resume, a request the
  machine cannot hold, ...) prints ``mvtcae: error: <message>`` and exits 1; a config error
  keeps click's usage message and exit status 2. ``--verbose`` adds the traceback.
- SIGINT (Ctrl-C) and SIGTERM (``kill``, ``ray job stop``) stop the command: the run it was
  training ends KILLED, and one line says how to continue it; the exit status is the shell's
  for that signal (130, 143). A second Ctrl-C is taken as "I know, it is stopping"; a third
  quits at once (the local Ray still goes with the process: `mvtcae.storage.processes`).
- Whatever the outcome, a local Ray the command started is stopped, every process of it.
"""

from __future__ import annotations

import functools
import logging
import os
import shlex
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from mvtcae.model.errors import Interrupted, UserError
from mvtcae.model.model_config import ConfigError

logger = logging.getLogger(__name__)


def config_options(config_help: str, set_example: str) -> Callable[[Callable[..., Any]], Any]:
    """The shared ``--config PATH`` and repeatable ``--set SECTION.FIELD=VALUE`` options (as the
    callback's ``config_path`` and ``overrides``); ``set_example`` ends the ``--set`` help."""

    def decorate(command: Callable[..., Any]) -> Any:
        command = click.option(
            "--set",
            "overrides",
            multiple=True,
            metavar="SECTION.FIELD=VALUE",
            help=f"Override a config value (repeatable), {set_example}",
        )(command)
        return click.option(
            "--config",
            "config_path",
            type=click.Path(dir_okay=False, path_type=Path),
            default=None,
            help=config_help,
        )(command)

    return decorate


def handles_failures(
    *, resumable: bool = False, usage_errors: tuple[str, ...] = ()
) -> Callable[[Callable[..., Any]], Any]:
    """Decorate a click command callback (below its ``@click.command``): adds ``--verbose``,
    sets up the console (`mvtcae.storage.console`) and ends the command as the module
    docstring says. ``resumable``: an interrupt's line says how to continue (the same command
    with ``--resume``). ``usage_errors``: dotted names of exception classes that, like a
    `ConfigError`, end the command with click's usage message (named, not imported, so that
    ``--help`` stays light)."""

    def decorate(command: Callable[..., Any]) -> Any:
        @click.option(
            "--verbose",
            is_flag=True,
            help="Also show Ray's, MLflow's and Optuna's INFO lines on the console (the run's "
            "log file has them anyway), and the traceback of an error.",
        )
        @functools.wraps(command)
        def run(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
            _console(verbose)
            try:
                with interrupts_raise():
                    return command(*args, **kwargs)
            except KeyboardInterrupt as err:
                stop = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
                click.echo(_interrupt_line(stop, resumable), err=True)
                raise SystemExit(stop.exit_code) from None
            except Exception as err:
                if isinstance(err, ConfigError | click.UsageError) or _is_one_of(err, usage_errors):
                    raise _usage(err) from None
                if not isinstance(err, UserError):
                    raise
                _explain(err, verbose)
                raise SystemExit(1) from None
            finally:
                _stop_local_ray()

        return run

    return decorate


def _usage(err: BaseException) -> click.UsageError:
    """The one place an error becomes click's usage message (exit status 2)."""
    return err if isinstance(err, click.UsageError) else click.UsageError(str(err))


def _is_one_of(err: BaseException, names: tuple[str, ...]) -> bool:
    return any(f"{c.__module__}.{c.__qualname__}" in names for c in type(err).__mro__)


def _console(verbose: bool) -> None:
    """The platform's log lines on stderr; Ray's, MLflow's and Optuna's INFO lines only with
    ``--verbose`` (in this process and the Ray processes it starts)."""
    from mvtcae.cli.logs import configure_logging
    from mvtcae.storage import console

    configure_logging()
    console.set_verbose(verbose)
    console.quiet_console()


def quiet_libraries(*modules: str) -> None:
    """Import ``modules`` (which set up their loggers on import: ray, mlflow, optuna) and keep
    their INFO lines off the console unless ``--verbose``."""
    import importlib

    from mvtcae.storage import console

    for name in modules:
        importlib.import_module(name)
    console.quiet_console()


def _explain(err: BaseException, verbose: bool) -> None:
    if verbose:
        traceback.print_exception(err, file=sys.stderr)
    click.echo(f"mvtcae: error: {err}", err=True)


def _interrupt_line(stop: Interrupted, resumable: bool) -> str:
    if stop.run is None:
        return f"mvtcae: interrupted ({stop.signal_name}) before a run started; nothing to resume"
    line = f"mvtcae: interrupted ({stop.signal_name}): run {stop.run} is KILLED"
    if resumable:
        line += f"; continue it with: {resume_command()}"
    return line


def resume_command() -> str:
    """The current command line with ``--resume`` (config and overrides as given)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return "the same command with --resume"
    words = ctx.command_path.split()
    params = ctx.params
    if params.get("config_path") is not None:
        words += ["--config", str(params["config_path"])]
    for override in params.get("overrides") or ():
        words += ["--set", override]
    return shlex.join([*words, "--resume"])


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """While inside: SIGINT and SIGTERM raise `Interrupted` in the main thread (once; see the
    module docstring for the next ones). Elsewhere than the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        received.append(signum)
        if len(received) == 1:
            raise Interrupted(signum)
        if len(received) == 2:
            logger.warning("stopping the run and its processes; interrupt again to quit at once")
            return
        os._exit(128 + signum)  # the local Ray is stopped by its watcher

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _stop_local_ray() -> None:
    """Stop the Ray this command started or connected to, if it did (a no-op otherwise)."""
    session = sys.modules.get("mvtcae.storage.ray_session")
    if session is None or not session.connected_here():
        return
    try:
        session.shutdown()
    except Exception as err:  # noqa: BLE001 - never hide how the command ended
        logger.warning("could not stop Ray cleanly: %s: %s", type(err).__name__, err)
