"""Where training runs live in run storage, and which one ``--resume`` continues.

A run is the directory ``<train.storage_path>/<name>-<UTC stamp>`` (Ray Train's run directory,
with checkpoints) holding ``mvtcae_run.json``: its MLflow run id, the (redacted) config and its
start time. Each new run also adds one small entry to an index kept per run name,
``<train.storage_path>/mvtcae_runs/<name>/<run directory>.json``, so that resuming reads just
that name's entries (never a listing of every run of an object store) and picks the newest by
recorded start time. Names must match exactly: resuming ``exp`` never continues ``exp-big``.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mvtcae import storage
from mvtcae.safety.names import check_name
from mvtcae.safety.redaction import redact, redact_text

RUN_STATE_FILE = "mvtcae_run.json"
INDEX_DIR = "mvtcae_runs"
_STAMP = r"\d{8}-\d{6}-\d{6}"


@dataclass(frozen=True)
class RunRecord:
    """One training run: its storage location, name and MLflow run."""

    location: str
    name: str
    mlflow_run_id: str
    started_at: float
    dataset_digest: str | None = None
    """The content digest of the dataset it trains on (None for runs recorded before)."""
    dataset_dir: str | None = None


def run_prefix(config: Any) -> str:
    """The run-name prefix of an experiment config: ``train.run_name`` or ``name``."""
    return check_name(config.train.run_name or config.name, "run name")


def new_run_name(prefix: str, now: datetime | None = None) -> str:
    """``<prefix>-<UTC stamp to the microsecond>``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S-%f")
    return f"{check_name(prefix, 'run name')}-{stamp}"


def create_run(
    config: Any,
    run_name: str,
    mlflow_run_id: str,
    dataset_digest: str | None = None,
    dataset_dir: str | None = None,
) -> RunRecord:
    """Write a new run's state file and its index entry; return the record."""
    root = config.train.storage_path
    record = RunRecord(
        location=storage.join(root, check_name(run_name, "run directory")),
        name=run_name,
        mlflow_run_id=mlflow_run_id,
        started_at=time.time(),
        dataset_digest=dataset_digest,
        dataset_dir=dataset_dir,
    )
    state = {
        "mlflow_run_id": mlflow_run_id,
        "run_name": run_name,
        "started_at": record.started_at,
        "dataset": {"digest": dataset_digest, "dir": redact_text(dataset_dir or "")},
        "config": redact(config.to_dict()),
    }
    storage.write_text(storage.join(record.location, RUN_STATE_FILE), json.dumps(state, indent=2))
    entry = {"run_name": run_name, "started_at": record.started_at, "mlflow_run_id": mlflow_run_id}
    storage.write_text(_index_entry(root, run_prefix(config), run_name), json.dumps(entry))
    return record


def find_latest_run(config: Any) -> RunRecord | None:
    """The newest run of exactly this config's run name, by recorded start time."""
    root, prefix = config.train.storage_path, run_prefix(config)
    entries = _indexed_runs(root, prefix) or _unindexed_runs(root, prefix)
    if not entries:
        return None
    newest = max(entries, key=lambda e: (e["started_at"], e["run_name"]))
    location = storage.join(root, newest["run_name"])
    state = json.loads(storage.read_text(storage.join(location, RUN_STATE_FILE)))
    dataset = state.get("dataset") or {}
    return RunRecord(
        location,
        newest["run_name"],
        state["mlflow_run_id"],
        newest["started_at"],
        dataset.get("digest"),
        dataset.get("dir") or None,
    )


def _index_entry(root: str, prefix: str, run_name: str) -> str:
    return storage.join(root, INDEX_DIR, prefix, f"{run_name}.json")


def _is_run_of(prefix: str, run_name: str) -> bool:
    return re.fullmatch(re.escape(prefix) + "-" + _STAMP, run_name) is not None


def _indexed_runs(root: str, prefix: str) -> list[dict[str, Any]]:
    """Index entries of this exact prefix whose run state still exists."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(storage.join(root, INDEX_DIR, prefix))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    entries = []
    for info in fs.get_file_info(pafs.FileSelector(path)):
        run_name = info.base_name.removesuffix(".json")
        if info.type != pafs.FileType.File or not _is_run_of(prefix, run_name):
            continue
        entry = json.loads(storage.read_text(storage.join(root, INDEX_DIR, prefix, info.base_name)))
        if storage.is_file(storage.join(root, run_name, RUN_STATE_FILE)):
            entries.append(entry)
    return entries


def _unindexed_runs(root: str, prefix: str) -> list[dict[str, Any]]:
    """Runs written before the index existed: exact-name directories, by recorded start."""
    entries = []
    for name in storage.list_dirs(root):
        state_file = storage.join(root, name, RUN_STATE_FILE)
        if not _is_run_of(prefix, name) or not storage.is_file(state_file):
            continue
        state = json.loads(storage.read_text(state_file))
        started = state.get("started_at")
        if started is None:  # older state files: the stamp in the name is the start time
            stamp = name[len(prefix) + 1 :]
            started = datetime.strptime(stamp, "%Y%m%d-%H%M%S-%f").replace(tzinfo=UTC).timestamp()
        entries.append({"run_name": name, "started_at": float(started)})
    return entries
