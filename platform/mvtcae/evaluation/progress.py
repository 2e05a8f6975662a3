"""Progress of the evaluation's longer loops: one updating line in a terminal, else a line
every few seconds at most.

A bar is for a person at a terminal. Elsewhere (Ray workers, tasks and Tune trials, whose output
Ray forwards to the driver line by line; a driver under ``ray job submit`` or writing to a file)
each redraw of a bar would become a line of its own, so the progress is a log line instead
(``mvtcae.evaluation.progress``), at most one every ``PROGRESS_EVERY_S`` seconds, and none for a
loop that finishes sooner.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 10.0
"""The shortest interval between two progress lines where the output is not a terminal."""


def _in_ray_worker() -> bool:
    if "ray" not in sys.modules:  # no Ray in this process: certainly not a Ray worker
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def _terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty()) and not _in_ray_worker()


def progress(items: Iterable[T], desc: str) -> Iterator[T]:
    """``items`` with their progress labelled ``desc`` (see the module docstring)."""
    if _terminal():
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=desc, leave=False)
        return
    yield from throttled(items, desc, PROGRESS_EVERY_S)


def throttled(
    items: Iterable[T],
    desc: str,
    every_s: float = PROGRESS_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
    emit: Callable[[str], None] | None = None,
) -> Iterator[T]:
    """``items``, with a line ``desc: done/total (pct)`` at most every ``every_s`` seconds
    (the first after ``every_s``); ``emit`` (default: an INFO log line) writes it."""
    emit = emit or logger.info
    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    last = clock()
    for done, item in enumerate(items, start=1):
        yield item
        now = clock()
        if now - last >= every_s:
            last = now
            of = f"/{total} ({100 * done // total}%)" if total else ""
            emit(f"{desc}: {done}{of}")
