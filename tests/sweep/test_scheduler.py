"""ASHA as the sweep builds it: rungs strictly before the last epoch, so a trial that trains all
its epochs is never stopped at its last report (which would cut its final evaluation)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from sweep_helpers import tiny_tune_file

from mvtcae.config import load_sweep_config
from mvtcae.sweep.sweep_driver import _scheduler

METRIC = "val/joint_nll"


def _spec(tmp_path: Path, epochs: int, grace: int) -> object:
    tune = {
        "num_samples": 4,
        "asha": {"enabled": True, "grace_period": grace, "reduction_factor": 2},
    }
    return load_sweep_config(tiny_tune_file(tmp_path, tmp_path / "ds", tune, epochs=epochs))


def _decisions(scheduler, values: dict[str, list[float]]) -> dict[str, list[str]]:
    """Feed each trial's per-epoch objective in epoch order, all trials side by side."""
    trials = {name: SimpleNamespace(trial_id=name) for name in values}
    for trial in trials.values():
        scheduler.on_trial_add(None, trial)
    decided: dict[str, list[str]] = {name: [] for name in values}
    epochs = len(next(iter(values.values())))
    for epoch in range(1, epochs + 1):
        for name, trial in trials.items():
            result = {"training_iteration": epoch, METRIC: values[name][epoch - 1]}
            decided[name].append(scheduler.on_trial_result(None, trial, result))
    return decided


@pytest.mark.parametrize("epochs", [2, 4, 5])
def test_no_trial_is_stopped_at_its_last_epoch(tmp_path, epochs):
    scheduler = _scheduler(_spec(tmp_path, epochs, grace=1))
    # Ever worse trials: each later one is below the cutoff of every rung it reaches.
    values = {f"t{i}": [10.0 * (i + 1)] * epochs for i in range(6)}
    decided = _decisions(scheduler, values)
    assert all(d[-1] == TrialScheduler.CONTINUE for d in decided.values()), decided
    # ... while ASHA still stops the worse half at its first rung.
    assert any(TrialScheduler.STOP in d[:-1] for d in decided.values()), decided


def test_grace_period_at_the_last_epoch_leaves_no_rung(tmp_path):
    assert type(_scheduler(_spec(tmp_path, 3, grace=3))) is FIFOScheduler  # ASHA subclasses it
