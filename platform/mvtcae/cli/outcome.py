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
from typing import Any

import click

from mvtcae.model.config import ConfigError
from mvtcae.model.errors import Interrupted, UserError

logger = logging.getLogger(__name__)


def handles_failures(*, resumable: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """Decorate a click command callback (below its ``@click.command``): adds ``--verbose``
    and ends the command as the module docstring says. ``resumable``: an interrupt's line says
    how to continue (the same command with ``--resume``)."""

    def decorate(command: Callable[..., Any]) -> Any:
        @click.option("--verbose", is_flag=True, help="On an error, show its traceback too.")
        @functools.wraps(command)
        def run(*args: Any, verbose: bool = False, **kwargs: Any) -> Any:
            try:
                with interrupts_raise():
                    return command(*args, **kwargs)
            except ConfigError as err:
                raise click.UsageError(str(err)) from None
            except UserError as err:
                _explain(err, verbose)
                raise SystemExit(1) from None
            except KeyboardInterrupt as err:
                stop = err if isinstance(err, Interrupted) else Interrupted(signal.SIGINT)
                click.echo(_interrupt_line(stop, resumable), err=True)
                raise SystemExit(stop.exit_code) from None
            finally:
                _stop_local_ray()

        return run

    return decorate


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
