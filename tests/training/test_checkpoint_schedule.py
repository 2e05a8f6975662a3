"""Checkpoints inside epochs: when they are due, how they are named and ordered, and what a sweep
refuses. (A fault that lands inside an epoch and its exact resume: tests/training/
test_shipped_faults.py; a drained node: tests/cluster/test_local_cluster.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mvtcae.config import CheckpointSection, ConfigError, load_sweep_config
from mvtcae.storage.checkpoints import checkpoint_dir_name, checkpoint_position
from mvtcae.training import checkpoint_schedule
from mvtcae.training.checkpoint_schedule import AGREE_EVERY_STEPS, CheckpointSchedule
from mvtcae.training.hosts import prune_inside_epochs, run_checkpoints

CPU = torch.device("cpu")


def _due_steps(schedule: CheckpointSchedule, steps: int) -> list[int]:
    return [s for s in range(1, steps + 1) if schedule.due(s) is not None]


def test_every_n_steps_counts_the_steps_of_the_epoch() -> None:
    schedule = CheckpointSchedule(CheckpointSection(every_steps=5), CPU)
    assert schedule.active
    assert _due_steps(schedule, 23) == [5, 10, 15, 20]
    assert not CheckpointSchedule(CheckpointSection(), CPU).active


def test_every_m_minutes_is_agreed_at_every_few_steps(monkeypatch) -> None:
    """The clock is read only at the steps where the group agrees on it."""
    now = [1000.0]
    monkeypatch.setattr(checkpoint_schedule.time, "monotonic", lambda: now[0])
    schedule = CheckpointSchedule(CheckpointSection(every_minutes=0.5), CPU)
    now[0] += 29.0
    assert _due_steps(schedule, 8) == []
    now[0] += 2.0  # 31 s since the start: due at the next agreed step, not before
    assert schedule.due(AGREE_EVERY_STEPS + 1) is None
    due = schedule.due(2 * AGREE_EVERY_STEPS)
    assert due is not None and due.reason == "every 0.5 minutes"
    schedule.written()
    assert schedule.due(3 * AGREE_EVERY_STEPS) is None  # the clock starts again


class _Drain:
    """A source of preemption notices whose first ``quiet`` polls say nothing."""

    def __init__(self, quiet: int) -> None:
        self.quiet, self.polls = quiet, 0

    def preemption_notice(self) -> object | None:
        self.polls += 1
        if self.polls <= self.quiet:
            return None
        return type(
            "Info",
            (),
            {
                "deadline_ms": time.time() * 1000 + 30_000,
                "preempted_node_to_ranks": {"ab" * 20: [1, 2]},
            },
        )()


def test_a_preemption_notice_is_acted_on_once(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(checkpoint_schedule.time, "monotonic", lambda: now[0])
    notices = _Drain(quiet=1)
    schedule = CheckpointSchedule(CheckpointSection(), CPU, notices=notices)
    assert schedule.active
    found = []
    for step in range(1, 41):
        now[0] += 0.4  # polled at most once a second (PREEMPTION_POLL_S)
        if (due := schedule.due(step)) is not None:
            found.append((step, due.reason))
    assert found == [(2 * AGREE_EVERY_STEPS, "preemption notice")], found
    # Every agreement (1.6 s apart here) may poll; after the notice no second checkpoint.
    assert notices.polls == 40 // AGREE_EVERY_STEPS

    # Fast steps: the polls (each a barrier of every worker) stay at most one a second.
    now[0], fast = 0.0, CheckpointSchedule(CheckpointSection(), CPU, notices=_Drain(quiet=99))
    for step in range(1, 201):
        now[0] += 0.05
        fast.due(step)
    assert fast.notices.polls <= 10 / checkpoint_schedule.PREEMPTION_POLL_S
    said = checkpoint_schedule.describe_notice(notices.preemption_notice())
    assert "drained for preemption" in said and "ranks [1, 2]" in said and "s left" in said


def test_checkpoints_inside_epochs_are_named_and_ordered_by_position(tmp_path: Path) -> None:
    names = [
        checkpoint_dir_name(3),
        checkpoint_dir_name(4, step=40),
        checkpoint_dir_name(4, step=8),
        checkpoint_dir_name(4),
        checkpoint_dir_name(4, "3f2a9c", step=12),
    ]
    assert names[1] == "checkpoint_epoch_0004_step_000040"
    assert [checkpoint_position(n) for n in names] == [(3, 0), (3, 40), (3, 8), (4, 0), (3, 12)]
    for name in names:
        (tmp_path / name).mkdir()
    assert run_checkpoints(str(tmp_path)) == [names[0], names[2], names[4], names[1], names[3]]
    # Writing the end of epoch 4 prunes the checkpoints inside it, and none of the epochs'.
    prune_inside_epochs(str(tmp_path), names[3])
    assert run_checkpoints(str(tmp_path)) == [names[0], names[3]]


def test_sweeps_refuse_checkpoints_inside_epochs() -> None:
    configs = Path(__file__).parents[2] / "jobs" / "configs"
    for option in ("train.checkpoint.every_steps=50", "train.checkpoint.every_minutes=10"):
        with pytest.raises(ConfigError, match=option.split("=")[0]):
            load_sweep_config(configs / "tune_demo.yaml", [option])
    with pytest.raises(ValueError):
        CheckpointSection(every_steps=0)


def test_after_a_notice_the_group_waits_for_the_deadline(monkeypatch) -> None:
    """After the checkpoint a notice asked for, the group trains no further: it waits until the
    deadline (and a margin) for Ray to stop it; without a deadline, a fixed time."""
    clock = [1_000.0]
    monkeypatch.setattr(checkpoint_schedule.time, "time", lambda: clock[0])

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    notice = type("Info", (), {"deadline_ms": 1_008_000, "preempted_node_to_ranks": {}})()
    waited = checkpoint_schedule.wait_for_deadline(notice, sleep=sleep)
    assert waited == pytest.approx(8.0 + checkpoint_schedule.DEADLINE_MARGIN_S)
    no_deadline = type("Info", (), {"deadline_ms": None, "preempted_node_to_ranks": {}})()
    waited = checkpoint_schedule.wait_for_deadline(no_deadline, sleep=sleep)
    assert waited == pytest.approx(checkpoint_schedule.UNKNOWN_DEADLINE_WAIT_S)
