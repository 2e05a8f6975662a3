"""Where the worker loop runs: a Ray Train worker group, or the caller's own process.

The loop (`mvtcae.training.loop`) asks its host for its rank, device, dataset shards and the
checkpoint to restore, and hands it each epoch's report. Two hosts answer:

- `RayTrainHost`: a worker of a ``TorchTrainer`` run (DDP, Ray Train's checkpoint upload,
  retention and worker restarts);
- `InProcessHost`: the caller's process, one worker. A single-worker sweep trial gains nothing
  from a worker group but pays for one: Ray Train starts a controller, a worker and several
  helper actors, each a fresh Python process, for every trial. (Ray Train's own local mode,
  ``num_workers=0``, refuses ``ray.train`` calls inside a Tune trial, so it cannot serve here.)
  What the worker group did around the loop, this host does: it writes each epoch's checkpoint
  to the run directory in run storage, under the name Ray Train would have used, keeps the
  newest ``keep``, passes every report on to Tune (metrics and the checkpoint's path, as Tune's
  Ray Train callback does), and restores the run's newest intact checkpoint when the same run
  is fitted again (a retried trial, a resumed sweep). A failure in the loop raises to the
  caller; there is no worker restart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import ray.train
import ray.train.torch
import ray.tune
import torch

from mvtcae import storage
from mvtcae.storage.checkpoints import CHECKSUMS, TRAINER_STATE, checkpoint_position

logger = logging.getLogger(__name__)

TUNE_CHECKPOINT_KEY = "checkpoint_path"
"""The metric that carries a checkpoint's path to Tune (the name Tune's Ray Train callback uses,
which the sweep driver reads)."""


class LoopHost(Protocol):
    """What the worker loop needs from whatever runs it."""

    kind: str
    """How the run's MLflow tag ``mvtcae.train.host`` names this host."""
    rank: int
    world: int
    local_rank: int
    """This worker's rank among the workers on its node (0: the node's first worker)."""

    def device(self) -> torch.device:
        """This worker's torch device."""
        ...

    def restore_point(self) -> ray.train.Checkpoint | None:
        """The checkpoint to resume from (restoring walks back past corrupt ones), or None."""
        ...

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model as trained by this host (DDP-wrapped in a worker group)."""
        ...

    def shard(self, split: str) -> Any:
        """This worker's Ray Data iterator of ``split``."""
        ...

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None = None,
        dir_name: str | None = None,
    ) -> None:
        """Report an epoch's metrics, with the checkpoint written in ``checkpoint_dir``."""
        ...

    def preemption_notice(self) -> Any | None:
        """Ray Train's notice that a node of the run is being drained, else None (a barrier:
        every rank calls it together)."""
        ...


class RayTrainHost:
    """A worker of a Ray Train worker group."""

    kind = "ray train worker group"

    def __init__(self, run_dir: str) -> None:
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.run_dir = run_dir

    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def restore_point(self) -> ray.train.Checkpoint | None:
        reported = ray.train.get_checkpoint()
        if reported is not None:  # newer ones beside it are found by the restore
            return reported
        # None reported yet: the run may still have checkpoints from inside its first epoch.
        names = run_checkpoints(self.run_dir)
        if not names:
            return None
        fs, path = storage.resolve(storage.join(self.run_dir, names[-1]))
        return ray.train.Checkpoint(path=path, filesystem=fs)

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(model)

    def shard(self, split: str) -> Any:
        return ray.train.get_dataset_shard(split)

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None = None,
        dir_name: str | None = None,
    ) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name)

    def preemption_notice(self) -> Any | None:
        return ray.train.get_preemption_info()


@dataclass
class InProcessHost:
    """The caller's own process as the one worker (see the module docstring)."""

    run_dir: str
    keep: int | None
    datasets: dict[str, Any] | None = None
    to_tune: bool = False
    kind: str = "in process"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: ray.train.Checkpoint | None = None
    restored_from: str | None = None
    """The run-storage location of the checkpoint the run restored, until it reports anew."""

    def device(self) -> torch.device:
        # Ray limits CUDA_VISIBLE_DEVICES to the GPUs this process holds (none: no CUDA).
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    def restore_point(self) -> ray.train.Checkpoint | None:
        names = run_checkpoints(self.run_dir)
        if not names:
            return None
        self.restored_from = storage.join(self.run_dir, names[-1])
        fs, path = storage.resolve(self.restored_from)
        # A run fitted again after its last epoch reports nothing new: it ends with this one.
        self.last_checkpoint = ray.train.Checkpoint(path=path, filesystem=fs)
        return self.last_checkpoint

    def report_restored_again(self, extra: dict[str, Any] | None = None) -> None:
        """When the run restored a checkpoint and trained nothing after it (it was cut after its
        last epoch), report that epoch's result again, from the checkpoint: every attempt of a
        Tune trial must end on a result that holds the sweep's objectives, or Tune's scheduler
        refuses it."""
        if self.restored_from is None or self.last_checkpoint is None:
            return
        state = json.loads(storage.read_text(storage.join(self.restored_from, TRAINER_STATE)))
        self.last_metrics = dict(state.get("metrics") or {}) | dict(extra or {})
        if self.to_tune:
            ray.tune.report(self.last_metrics | {TUNE_CHECKPOINT_KEY: self.last_checkpoint.path})

    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def preemption_notice(self) -> Any | None:
        return None  # no node of its own to lose: the trial's Tune actor is what is restarted

    def shard(self, split: str) -> Any:
        if not self.datasets or split not in self.datasets:
            raise KeyError(f"no dataset {split!r} was given to the in-process run")
        dataset = self.datasets[split]
        # In block order, as the worker group's DataConfig reads it: with the per-epoch shuffle
        # seeds an epoch's rows are then a function of (seed, epoch), also after a resume.
        dataset.context.execution_options.preserve_order = True
        return dataset.iterator()

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None = None,
        dir_name: str | None = None,
    ) -> None:
        self.restored_from = None
        checkpoint = None
        if checkpoint_dir is not None:
            if dir_name is None:
                raise ValueError("an in-process checkpoint needs its directory name")
            checkpoint = persist_checkpoint(checkpoint_dir, self.run_dir, dir_name, self.keep)
            self.last_checkpoint = checkpoint
        self.last_metrics = dict(metrics)
        if self.to_tune:
            extra = {TUNE_CHECKPOINT_KEY: checkpoint.path} if checkpoint is not None else {}
            ray.tune.report(dict(metrics) | extra)


def run_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint directory names of a run, oldest first."""
    names = [n for n in storage.list_dirs(run_dir) if checkpoint_position(n) is not None]
    return sorted(names, key=lambda n: (checkpoint_position(n) or (0, 0), n))


def prune_inside_epochs(run_dir: str, newest: str) -> None:
    """Delete the run's checkpoints from inside epochs that lie before ``newest`` (a checkpoint
    just written): only the newest position matters for a restart, and the epochs' own
    checkpoints are Ray's (or `persist_checkpoint`'s) to keep."""
    position = checkpoint_position(newest) or (0, 0)
    for name in run_checkpoints(run_dir):
        here = checkpoint_position(name)
        if name != newest and here is not None and here[1] and here < position:
            fs, path = storage.resolve(storage.join(run_dir, name))
            fs.delete_dir(path)


def persist_checkpoint(
    local_dir: str | Path, run_dir: str, dir_name: str, keep: int | None
) -> ray.train.Checkpoint:
    """Move a checkpoint written in ``local_dir`` to ``<run_dir>/<dir_name>`` (its checksums
    last), then delete all but the newest ``keep`` checkpoints of the run (None keeps all). The
    new one is complete before any old one goes."""
    location = storage.join(run_dir, dir_name)
    # The checksums go last: a checkpoint directory with its checksums is complete, which a
    # reader of the run directory may rely on before it verifies them.
    checksums = Path(local_dir) / CHECKSUMS
    text = checksums.read_text()
    checksums.unlink()
    storage.upload_directory(local_dir, location)
    storage.write_text(storage.join(location, CHECKSUMS), text)
    if keep is not None:
        for name in run_checkpoints(run_dir)[:-keep]:
            if name != dir_name:
                fs, path = storage.resolve(storage.join(run_dir, name))
                fs.delete_dir(path)
    fs, path = storage.resolve(location)
    return ray.train.Checkpoint(path=path, filesystem=fs)
