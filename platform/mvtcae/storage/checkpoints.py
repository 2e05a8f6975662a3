"""Training checkpoints as plain directories: nothing in them executes code when loaded.

Layout of one checkpoint directory:
  model_config.json, model.safetensors   the model (``MVTCAE.save``)
  optimizer.pt, scheduler.pt             state dicts (``torch.save``, read with weights_only=True)
  trainer_state.json                     epoch, the epoch's metrics, precision, world size
  rng_state.json                         every rank's torch, NumPy and Python generator states
  checksums.json                         size and SHA-256 of every other file; written last

A checkpoint is *intact* when ``checksums.json`` exists and every file it lists has the recorded
size and digest. Restoring walks from the newest checkpoint of a run to older ones and takes the
first intact one, so a truncated upload or a damaged file costs epochs, never the run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import posixpath
import random
import re
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import torch

from mvtcae import MVTCAE
from mvtcae.model.errors import UserError
from mvtcae.model.persistence import ARCHITECTURE_FILE, CONFIG_FILE, WEIGHTS_FILE
from mvtcae.safety.trust import platform_trusted_modules

# What loading the model needs (the architecture file exists only for custom networks).
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, ARCHITECTURE_FILE)
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
SCHEDULER_STATE = "scheduler.pt"
RNG_STATE = "rng_state.json"
CHECKSUMS = "checksums.json"
# checkpoint_epoch_0007 (the end of epoch 7), checkpoint_epoch_0008_step_000040 (epoch 8 after
# its 40th step), or either with -3f2a9c for work trained again after a restore fell back past
# a corrupt checkpoint (a new name, so that Ray's bookkeeping of the old directory never
# deletes the new one).
CHECKPOINT_DIR_PATTERN = re.compile(r"^checkpoint_epoch_(\d+)(?:_step_(\d+))?(?:-[0-9a-f]+)?$")

logger = logging.getLogger(__name__)


class CorruptCheckpointError(UserError, RuntimeError):
    """A checkpoint whose files are missing or differ from its recorded checksums."""


@dataclass
class TrainerState:
    """Where training stood when the checkpoint was written: ``epoch`` epochs done and, for a
    checkpoint inside the next epoch, ``step`` of its steps trained over its first ``rows``
    rows (positions in the epoch's order), with the group's loss sums of those steps in
    ``partial`` (so that the epoch's metrics still cover all of it after a restart)."""

    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    world_size: int = 1
    step: int = 0
    rows: int = 0
    partial: dict[str, float] = field(default_factory=dict)

    @property
    def position(self) -> tuple[int, int]:
        """(epochs done, steps of the next epoch done): checkpoints order by it."""
        return (self.epoch, self.step)


def save_checkpoint(
    directory: str | Path,
    model: MVTCAE,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write model, optimizer, scheduler, trainer state and (per rank) RNG states into
    ``directory``, then the checksums of all of them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_STATE)
    torch.save(scheduler.state_dict(), directory / SCHEDULER_STATE)
    (directory / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
    if rng_states is not None:
        (directory / RNG_STATE).write_text(json.dumps({"ranks": rng_states}))
    write_checksums(directory)
    return directory


def read_trainer_state(directory: str | Path) -> TrainerState:
    """Read the trainer state of a checkpoint directory."""
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a training checkpoint: {TRAINER_STATE} missing"
        )
    return TrainerState(**json.loads(path.read_text()))


def load_model(directory: str | Path, trusted_modules: Iterable[str] | None = None) -> MVTCAE:
    """The model saved in a checkpoint directory.

    Custom networks are rebuilt only from ``mvtcae``, ``MVTCAE_TRUSTED_MODULES`` and
    ``trusted_modules`` (see `mvtcae.safety.trust`).
    """
    return MVTCAE.load(Path(directory), trusted_modules=platform_trusted_modules(trusted_modules))


def restore_optimizer(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    map_location: str | torch.device = "cpu",
) -> TrainerState:
    """Restore optimizer and scheduler state in place; return the checkpoint's trainer state.

    The saved state is matched to ``optimizer``'s parameters by name when both record names
    (an optimizer built from ``named_parameters()``), else by position; either way every saved
    tensor must have its parameter's shape, or CorruptCheckpointError names the parameter.
    """
    directory = Path(directory)
    saved = _load_state(directory / OPTIMIZER_STATE, map_location)
    optimizer.load_state_dict(_matched_to(optimizer, saved, directory / OPTIMIZER_STATE))
    scheduler.load_state_dict(_load_state(directory / SCHEDULER_STATE, map_location))
    return read_trainer_state(directory)


def _matched_to(
    optimizer: torch.optim.Optimizer, saved: dict[str, Any], source: Path
) -> dict[str, Any]:
    """``saved`` with each group's parameters in ``optimizer``'s order, its shapes checked.

    torch restores optimizer state by position and does not check shapes; its fused kernels
    then write past the end of a moment buffer that belongs to another parameter.
    """
    groups, saved_groups = optimizer.param_groups, saved.get("param_groups", [])
    if len(groups) != len(saved_groups):
        raise CorruptCheckpointError(
            f"{source}: {len(saved_groups)} parameter groups where the optimizer has {len(groups)}"
        )
    matched_groups = []
    for index, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
        named = bool(group.get("param_names"))
        names = group["param_names"] if named else [f"#{i}" for i in range(len(group["params"]))]
        ids = _saved_ids_by_name(saved_group, names if named else None, len(names), source, index)
        for name, param, saved_id in zip(names, group["params"], ids, strict=True):
            for key, value in saved.get("state", {}).get(saved_id, {}).items():
                if (
                    isinstance(value, torch.Tensor)
                    and value.dim() > 0
                    and value.shape != param.shape
                ):
                    raise CorruptCheckpointError(
                        f"{source}: optimizer state {key!r} of parameter {name} has shape "
                        f"{tuple(value.shape)}, the model's parameter {tuple(param.shape)}; the "
                        "checkpoint does not belong to this model"
                    )
        matched = dict(saved_group, params=ids)
        if "param_names" in saved_group:
            matched["param_names"] = list(names)
        matched_groups.append(matched)
    return dict(saved, param_groups=matched_groups)


def _saved_ids_by_name(
    saved_group: dict[str, Any], names: list[str] | None, count: int, source: Path, index: int
) -> list[Any]:
    """The saved group's state ids in the order of ``names`` (by position without names)."""
    ids = list(saved_group["params"])
    if len(ids) != count:
        raise CorruptCheckpointError(
            f"{source}: parameter group {index} holds {len(ids)} parameters where the "
            f"optimizer has {count}; the checkpoint does not belong to this model"
        )
    saved_names = saved_group.get("param_names")
    if not saved_names or names is None:
        return ids
    by_name = dict(zip(saved_names, ids, strict=True))
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise CorruptCheckpointError(
            f"{source}: no optimizer state for parameters {unknown[:5]} (of {len(unknown)}); "
            "the checkpoint does not belong to this model"
        )
    return [by_name[name] for name in names]


def _load_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    return torch.load(path, map_location=map_location, weights_only=True)


# --------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(4 * 2**20):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: str | Path) -> dict[str, dict[str, Any]]:
    """Record size and SHA-256 of every file of a checkpoint directory in ``checksums.json``."""
    directory = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != CHECKSUMS
    }
    (directory / CHECKSUMS).write_text(json.dumps({"files": files}, indent=2))
    return files


def verify_checkpoint(directory: str | Path, files: Iterable[str] | None = None) -> None:
    """Raise CorruptCheckpointError naming the first file that is missing or does not match
    ``checksums.json``; ``files`` limits the check to those names (e.g. the model files of a
    partial download)."""
    directory = Path(directory)
    try:
        recorded = json.loads((directory / CHECKSUMS).read_text())["files"]
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{directory}: no {CHECKSUMS} (an incomplete checkpoint, or one written before "
            "checkpoints were verified)"
        ) from None
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{directory / CHECKSUMS}: unreadable ({err})") from None
    wanted = set(recorded) if files is None else set(files) & set(recorded)
    for name in sorted(wanted):
        path = directory / name
        expected = recorded[name]
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing (listed in {CHECKSUMS})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CorruptCheckpointError(
                f"{path}: {size} bytes where {CHECKSUMS} records {expected['bytes']} (truncated?)"
            )
        if _sha256(path) != expected["sha256"]:
            raise CorruptCheckpointError(f"{path}: SHA-256 differs from {CHECKSUMS}")


# --------------------------------------------------------------------------------------------
# Random number generator states
# --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU and CUDA), NumPy and Python generator states, JSON-safe."""

    def encode(tensor: torch.Tensor) -> str:
        return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch_cpu": encode(torch.get_rng_state()),
        "torch_cuda": [encode(s) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available()
        else [],
        "numpy": {
            "kind": kind,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set this process's generators to a :func:`capture_rng_state` snapshot."""

    def decode(text: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.uint8).copy())

    torch.set_rng_state(decode(state["torch_cpu"]))
    cuda = state.get("torch_cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([decode(s) for s in cuda])
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np.asarray(np_state["keys"], dtype=np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))


def read_rng_states(directory: str | Path) -> list[dict[str, Any]] | None:
    """The per-rank RNG states of a checkpoint, or None when it has none."""
    path = Path(directory) / RNG_STATE
    if not path.is_file():
        return None
    return json.loads(path.read_text())["ranks"]


# --------------------------------------------------------------------------------------------
# Finding an intact checkpoint to restore
# --------------------------------------------------------------------------------------------
@dataclass
class RestoredCheckpoint:
    """An intact checkpoint, available as a local directory, and the corrupt ones passed over."""

    directory: Path
    path: str
    skipped: list[str] = field(default_factory=list)


def checkpoint_dir_name(epoch: int, suffix: str = "", step: int = 0) -> str:
    """The checkpoint directory name of the end of ``epoch``, or, with ``step``, of ``epoch``
    after that many of its steps (``suffix``: see CHECKPOINT_DIR_PATTERN)."""
    name = f"checkpoint_epoch_{epoch:04d}" + (f"_step_{step:06d}" if step else "")
    return name + (f"-{suffix}" if suffix else "")


def checkpoint_position(path: str) -> tuple[int, int] | None:
    """(epochs done, steps of the next epoch done) of a checkpoint directory name, else None:
    ``checkpoint_epoch_0007`` is (7, 0), ``checkpoint_epoch_0008_step_000040`` is (7, 40)."""
    match = CHECKPOINT_DIR_PATTERN.match(posixpath.basename(path.rstrip("/")))
    if not match:
        return None
    epoch, step = int(match.group(1)), int(match.group(2) or 0)
    return (epoch - 1, step) if step else (epoch, 0)


def checkpoint_epoch(path: str) -> int | None:
    """The epochs a checkpoint directory's name says were done, else None."""
    position = checkpoint_position(path)
    return None if position is None else position[0]


def restore_candidates(filesystem: pafs.FileSystem, latest: str) -> list[str]:
    """The checkpoints of ``latest``'s run directory, newest first (``latest`` first among
    equals).

    ``latest`` is the newest checkpoint Ray Train registered. One written after it can exist:
    an interrupt can land after a worker wrote a checkpoint and before the controller recorded
    it. Every checkpoint is complete before its ``checksums.json``, so the newest intact one is
    a real state of the run, and resuming behind it would train (and log) its epoch again.
    """
    run_dir = posixpath.dirname(latest.rstrip("/"))
    selector = pafs.FileSelector(run_dir, allow_not_found=True)
    others = [
        info.path
        for info in filesystem.get_file_info(selector)
        if info.type == pafs.FileType.Directory
        and checkpoint_position(info.path) is not None
        and info.path.rstrip("/") != latest.rstrip("/")
    ]
    candidates = [latest, *others]
    # A stable sort: ``latest`` stays ahead of another directory of its position.
    candidates.sort(key=lambda p: checkpoint_position(p) or (0, 0), reverse=True)
    return candidates


@contextmanager
def _local_copy(filesystem: pafs.FileSystem, path: str) -> Iterator[Path]:
    if isinstance(filesystem, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="mvtcae-restore-") as tmp:
        pafs.copy_files(
            path, tmp, source_filesystem=filesystem, destination_filesystem=pafs.LocalFileSystem()
        )
        yield Path(tmp)


@contextmanager
def open_intact_checkpoint(
    filesystem: pafs.FileSystem, latest: str
) -> Iterator[RestoredCheckpoint]:
    """The newest intact checkpoint of ``latest``'s run, as a local directory.

    Corrupt ones are skipped with a warning naming the bad file; CorruptCheckpointError when
    none is intact.
    """
    skipped: list[str] = []
    for path in restore_candidates(filesystem, latest):
        with _local_copy(filesystem, path) as local:
            try:
                verify_checkpoint(local)
            except CorruptCheckpointError as err:
                logger.warning("skipping corrupt checkpoint %s: %s", path, err)
                skipped.append(f"{posixpath.basename(path.rstrip('/'))}: {err}")
                continue
            yield RestoredCheckpoint(directory=local, path=path, skipped=skipped)
            return
    raise CorruptCheckpointError(
        f"no intact checkpoint to restore in {posixpath.dirname(latest.rstrip('/'))}: "
        + "; ".join(skipped)
    )


def rank_by_metric(
    entries: Iterable[tuple[Any, dict[str, Any]]], metric: str, mode: str
) -> list[tuple[Any, dict[str, Any]]]:
    """(checkpoint, metrics) pairs best first by ``metric``; missing or non-finite values last."""

    def key(entry: tuple[Any, dict[str, Any]]) -> tuple[int, float]:
        value = entry[1].get(metric)
        if not isinstance(value, int | float) or isinstance(value, bool) or not np.isfinite(value):
            return (1, 0.0)
        return (0, float(value) if mode == "min" else -float(value))

    return sorted(entries, key=key)
