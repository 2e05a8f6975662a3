"""``ModelOutput``: a dict whose keys are also attributes (pythae/multivae style)."""

from __future__ import annotations

from typing import Any


class ModelOutput(dict):
    """A dict of outputs that also allows ``out.loss`` style access."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value
