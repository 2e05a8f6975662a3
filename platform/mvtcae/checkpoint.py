"""Training checkpoints as plain directories: nothing in them executes code when loaded.

Layout of one checkpoint directory:
  model_config.json, model.safetensors   the model (``MVTCAE.save``)
  optimizer.pt, scheduler.pt             state dicts (``torch.save``, read with weights_only=True)
  trainer_state.json                     epoch, the epoch's metrics, precision, world size
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mvtcae import MVTCAE
from mvtcae.model.persistence import ARCHITECTURE_FILE, CONFIG_FILE, WEIGHTS_FILE

# What loading the model needs (the architecture file exists only for custom networks).
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE, ARCHITECTURE_FILE)
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.pt"
SCHEDULER_STATE = "scheduler.pt"


@dataclass
class TrainerState:
    """Where training stood when the checkpoint was written."""

    epoch: int
    metrics: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"
    world_size: int = 1


def save_checkpoint(
    directory: str | Path,
    model: MVTCAE,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainerState,
) -> Path:
    """Write model, optimizer, scheduler and trainer state into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save(directory)
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_STATE)
    torch.save(scheduler.state_dict(), directory / SCHEDULER_STATE)
    (directory / TRAINER_STATE).write_text(json.dumps(asdict(state), indent=2))
    return directory


def read_trainer_state(directory: str | Path) -> TrainerState:
    """Read the trainer state of a checkpoint directory."""
    path = Path(directory) / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a training checkpoint: {TRAINER_STATE} missing"
        )
    return TrainerState(**json.loads(path.read_text()))


def load_model(directory: str | Path) -> MVTCAE:
    """The model saved in a checkpoint directory."""
    return MVTCAE.load(Path(directory))


def restore_optimizer(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    map_location: str | torch.device = "cpu",
) -> TrainerState:
    """Restore optimizer and scheduler state in place; return the checkpoint's trainer state."""
    directory = Path(directory)
    optimizer.load_state_dict(_load_state(directory / OPTIMIZER_STATE, map_location))
    scheduler.load_state_dict(_load_state(directory / SCHEDULER_STATE, map_location))
    return read_trainer_state(directory)


def _load_state(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} is missing")
    return torch.load(path, map_location=map_location, weights_only=True)
