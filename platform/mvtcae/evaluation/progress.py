"""Progress bars for evaluation: tqdm in a terminal, Ray's tqdm inside Ray workers and tasks.

Inside a Ray worker a plain tqdm bar reaches the driver as one log line per redraw; Ray's own
tqdm (``ray.experimental.tqdm_ray``) sends updates that the driver renders as a single bar.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _in_ray_worker() -> bool:
    import sys

    if "ray" not in sys.modules:  # no Ray in this process: certainly not a Ray worker
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def progress(items: Iterable[T], desc: str) -> Iterator[T]:
    """``items`` with a progress bar labelled ``desc`` that disappears when done."""
    if _in_ray_worker():
        from ray.experimental.tqdm_ray import tqdm as ray_tqdm

        yield from ray_tqdm(items, desc=desc)
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, leave=False)
