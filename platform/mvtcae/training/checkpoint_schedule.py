"""When a worker group writes a checkpoint inside an epoch: every N steps, every M minutes, and
at the first step boundary after Ray Train says that a node of the run is being drained (after
which the group waits for the node's deadline, `wait_for_deadline`).

Every rank asks at every step and must get the same answer, since writing a checkpoint is a
collective. Steps are counted alike on every rank; clocks are not, so every `AGREE_EVERY_STEPS`
steps the group takes the maximum of each rank's "time is up" flags (one small all-reduce), and
only then asks Ray Train for a preemption notice (a barrier of its own, at most once per
`PREEMPTION_POLL_S`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mvtcae.config import CheckpointSection
from mvtcae.training.collectives import all_reduce

logger = logging.getLogger(__name__)

AGREE_EVERY_STEPS = 4
"""Steps between the group's agreements on its clocks (an all-reduce of two numbers)."""
PREEMPTION_POLL_S = 1.0
"""The least time between two preemption polls (each is a barrier of every worker)."""
DEADLINE_MARGIN_S = 60.0
"""How long past a notice's deadline the group waits for Ray to stop it before training on."""
UNKNOWN_DEADLINE_WAIT_S = 180.0
"""How long the group waits after a notice without a deadline (Ray Train gives those 120 s)."""


class NoticeSource(Protocol):
    """Where preemption notices come from (a Ray Train worker; None: never)."""

    def preemption_notice(self) -> Any | None:
        """Ray Train's ``PreemptionInfo`` when a node of the run is being drained, else None
        (every rank calls it together)."""
        ...


@dataclass
class Due:
    """Why a checkpoint is due now; ``notice`` is Ray Train's ``PreemptionInfo`` for one."""

    reason: str
    notice: Any | None = None


class CheckpointSchedule:
    """Decides at each step boundary whether the group writes a checkpoint inside the epoch."""

    def __init__(
        self,
        section: CheckpointSection,
        device: torch.device,
        notices: NoticeSource | None = None,
    ) -> None:
        self.every_steps = section.every_steps
        self.every_s = None if section.every_minutes is None else 60.0 * section.every_minutes
        self.device, self.notices = device, notices
        self.last_written = self.last_poll = time.monotonic()
        self.noticed = False
        """A notice was acted on: one checkpoint per drain, however long its deadline."""

    @property
    def active(self) -> bool:
        """Whether any checkpoint inside an epoch can ever be due."""
        return self.every_steps is not None or self.every_s is not None or self.notices is not None

    def due(self, step: int) -> Due | None:
        """Whether a checkpoint is due after the epoch's ``step``-th step (every rank calls
        this with the same steps)."""
        if self.every_steps is not None and step % self.every_steps == 0:
            return Due(f"every {self.every_steps} steps")
        if step % AGREE_EVERY_STEPS or (self.every_s is None and self.notices is None):
            return None
        now = time.monotonic()
        flags = {
            "clock": float(self.every_s is not None and now - self.last_written >= self.every_s),
            "poll": float(self.notices is not None and now - self.last_poll >= PREEMPTION_POLL_S),
        }
        agreed = all_reduce(flags, self.device, op="max")
        if agreed["poll"] > 0 and self.notices is not None:
            self.last_poll = now
            notice = self.notices.preemption_notice()
            if notice is not None and not self.noticed:
                self.noticed = True
                return Due("preemption notice", notice)
        if agreed["clock"] > 0:
            return Due(f"every {self.every_s / 60.0:g} minutes")
        return None

    def written(self) -> None:
        """A checkpoint was written (inside the epoch or at its end): the clock starts again."""
        self.last_written = time.monotonic()


def wait_for_deadline(notice: Any, sleep: Any = time.sleep) -> float:
    """Every rank, after the checkpoint a notice asked for: train no further and wait for Ray
    Train to stop the group at the notice's deadline (returns the seconds waited).

    What the group would train after the checkpoint is lost at the restart anyway. And a group
    still stepping when the drained node goes down fails in its collectives first (the peers'
    connections reset), which Ray counts as a worker failure, against ``max_failures``; a group
    that waits is stopped by Ray at the deadline as a preemption. Should Ray not stop it (a
    drain without a deadline waits `UNKNOWN_DEADLINE_WAIT_S`), training goes on after
    `DEADLINE_MARGIN_S` more."""
    deadline_ms = getattr(notice, "deadline_ms", None)
    if deadline_ms is None:
        until = time.time() + UNKNOWN_DEADLINE_WAIT_S
    else:
        until = deadline_ms / 1000.0 + DEADLINE_MARGIN_S
    started = time.time()
    while (left := until - time.time()) > 0:
        sleep(min(left, 1.0))
    return time.time() - started


def describe_notice(notice: Any) -> str:
    """A preemption notice in words: the nodes drained, their workers, the time left."""
    nodes = getattr(notice, "preempted_node_to_ranks", {}) or {}
    parts = [f"node {node[:8]} (ranks {sorted(ranks)})" for node, ranks in sorted(nodes.items())]
    deadline_ms = getattr(notice, "deadline_ms", None)
    left = "" if deadline_ms is None else f", {deadline_ms / 1000.0 - time.time():.0f} s left"
    return (", ".join(parts) or "a node") + " drained for preemption" + left
