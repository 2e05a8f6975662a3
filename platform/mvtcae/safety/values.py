"""Numbers as they arrive from metrics dicts, tags and JSON: which of them can be trusted."""

from __future__ import annotations

import math
from typing import Any


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or float (a bool is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a number, or a text of one, that is neither NaN nor infinite."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return is_number(value) and math.isfinite(value)
