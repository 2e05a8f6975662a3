"""Where a job's wall time goes: the driver's phases, timed and logged as ``time/<phase>_s``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class PhaseTimes:
    """Wall seconds of each named phase of one job, in the order they first ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as phase ``name`` (added to what the phase already took)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        """The phases as MLflow metric names and values: ``time/<phase>_s``."""
        return {f"time/{name}_s": value for name, value in self.seconds.items()}


@contextmanager
def timed(phases: PhaseTimes | None, name: str) -> Iterator[None]:
    """``phases.phase(name)``, or nothing when no one is timing."""
    if phases is None:
        yield
        return
    with phases.phase(name):
        yield
