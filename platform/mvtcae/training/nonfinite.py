"""Non-finite losses, gradient norms and metrics: caught at the step where they appear.

A run whose loss turns NaN would otherwise train on with NaN weights, checkpoint them and hand
them to evaluation and the registry. `StepGuard` checks each training step's loss terms (and
gradient norm, when clipping computes one) before the optimizer applies them: under the
``raise`` policy the run stops there with a `NonFiniteError` naming the epoch, the step and the
terms that went non-finite; under ``skip`` the step's update is dropped and counted, and the run
stops once more steps than its budget were dropped. In data-parallel training every rank takes
the same decision (one all-reduce of a flag per step), so the workers stop or skip together.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from mvtcae.model.errors import UserError

logger = logging.getLogger(__name__)

REPORT_PREFIX = "nonfinite/"


class NonFiniteError(UserError, RuntimeError):
    """Training produced NaN or infinite values; the message names where and which terms."""

    def __init__(
        self, epoch: int, step: int | None, terms: Mapping[str, float], detail: str = ""
    ) -> None:
        self.epoch = int(epoch)
        self.step = step
        self.terms = {k: float(v) for k, v in terms.items()}
        self.detail = detail
        shown = ", ".join(f"{k}={v}" for k, v in self.terms.items()) or "none recorded"
        where = f"epoch {self.epoch}, " + ("validation" if step is None else f"step {step}")
        super().__init__(
            f"non-finite values at {where}: {shown}{'; ' + detail if detail else ''}. "
            "Lower train.optimizer.lr, set train.grad_clip_norm, use precision fp32, or set "
            "train.on_nonfinite=skip to drop such steps (bounded by train.max_nonfinite_steps)"
        )

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        # Ray pickles the error to carry it from a worker to the driver; the default reduce
        # would call __init__ with the message alone.
        return (type(self), (self.epoch, self.step, self.terms, self.detail))

    def to_report(self) -> dict[str, Any]:
        """Metrics that tell the driver, through ``ray.train.report``, why training stopped."""
        return {
            "epoch": self.epoch,
            REPORT_PREFIX + "epoch": self.epoch,
            REPORT_PREFIX + "step": -1 if self.step is None else self.step,
            REPORT_PREFIX + "terms": ", ".join(f"{k}={v}" for k, v in self.terms.items()),
            REPORT_PREFIX + "message": str(self),
        }

    @classmethod
    def from_report(cls, metrics: Mapping[str, Any] | None) -> NonFiniteError | None:
        """The error a worker reported with :meth:`to_report`, or None."""
        if not metrics or REPORT_PREFIX + "message" not in metrics:
            return None
        step = int(metrics[REPORT_PREFIX + "step"])
        error = cls(int(metrics[REPORT_PREFIX + "epoch"]), None if step < 0 else step, {})
        error.args = (str(metrics[REPORT_PREFIX + "message"]),)
        return error


def nonfinite_values(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` that are NaN or infinite."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and not math.isfinite(v)
    }


class StepGuard:
    """Decides, per training step, whether its update may be applied (see the module doc).

    ``agree`` combines the local "all finite" flag across workers (a MIN all-reduce); the
    default is the local flag alone.
    """

    def __init__(
        self,
        policy: str = "raise",
        budget: int = 10,
        agree: Callable[[torch.Tensor], torch.Tensor] | None = None,
        skipped: int = 0,
    ) -> None:
        if policy not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {policy!r}")
        self.policy = policy
        self.budget = budget
        self.agree = agree
        self.skipped = skipped

    def finite(self, sums: Mapping[str, torch.Tensor]) -> bool:
        """Whether every value is finite on every worker (one host read per step)."""
        flag = torch.isfinite(torch.stack([v.detach().float() for v in sums.values()])).all()
        if self.agree is not None:
            flag = self.agree(flag.float()) > 0.5
        return bool(flag)

    def reject(self, epoch: int, step: int, sums: Mapping[str, torch.Tensor]) -> None:
        """A non-finite step: raise NonFiniteError, or count it as skipped (within budget)."""
        local = {k: float(v) for k, v in sums.items()}
        terms = nonfinite_values(local) or {"(another worker)": math.nan}
        if self.policy == "raise":
            raise NonFiniteError(epoch, step, terms)
        self.skipped += 1
        if self.skipped > self.budget:
            raise NonFiniteError(
                epoch,
                step,
                terms,
                f"{self.skipped} steps skipped, over train.max_nonfinite_steps={self.budget}",
            )
        logger.warning(
            "epoch %d, step %d: non-finite %s; update skipped (%d of %d allowed)",
            epoch,
            step,
            ", ".join(f"{k}={v}" for k, v in terms.items()),
            self.skipped,
            self.budget,
        )
