"""The stop record: how the workers end a run on an error that a restart cannot fix, and how the
driver learns of it after ``fit``.
"""

from __future__ import annotations

import json
from typing import Any

from mvtcae import storage
from mvtcae.storage.checkpoints import CorruptCheckpointError
from mvtcae.training.hosts import LoopHost
from mvtcae.training.nonfinite import NonFiniteError

STOP_FILE = "mvtcae_stop.json"
"""Written by rank 0 into the run directory when the workers stop on an error that a restart
cannot fix (non-finite values, no intact checkpoint); the driver raises it after ``fit``.
Ray Train keeps only the metrics reported with checkpoints, so a report cannot carry it."""


CORRUPT_REPORT_KEY = "checkpoint/corrupt"


def stop_workers(run_dir: str, host: LoopHost, record: dict[str, Any]) -> None:
    """End training on every rank: rank 0 records why for the driver; all ranks report it (so
    that a Tune callback sees it at this epoch) and return instead of raising, which Ray would
    answer by restarting the workers."""
    if host.rank == 0:
        storage.write_text(storage.join(run_dir, STOP_FILE), json.dumps(record))
    host.report(record)


def read_stop_record(run_dir: str) -> dict[str, Any] | None:
    """The record of a run's workers stopping on an unfixable error, or None."""
    location = storage.join(run_dir, STOP_FILE)
    return json.loads(storage.read_text(location)) if storage.is_file(location) else None


def raise_for_stop(record: dict[str, Any] | None) -> None:
    """Raise the error a stop record describes (NonFiniteError or CorruptCheckpointError)."""
    if not record:
        return
    failure = NonFiniteError.from_report(record)
    if failure is not None:
        raise failure
    if CORRUPT_REPORT_KEY in record:
        raise CorruptCheckpointError(record[CORRUPT_REPORT_KEY])


def clear_stop_record(run_dir: str) -> None:
    """Forget an earlier stop before the run is fitted again (e.g. resumed with a lower lr)."""
    location = storage.join(run_dir, STOP_FILE)
    if storage.is_file(location):
        fs, path = storage.resolve(location)
        fs.delete_file(path)
