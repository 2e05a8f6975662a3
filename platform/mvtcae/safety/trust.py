"""Which modules the platform's own loaders may rebuild custom networks from.

`MVTCAE.load` rebuilds networks recorded in a model directory only from ``mvtcae`` and the
modules its caller names. The platform loads models where no caller can pass that list (Ray
workers restoring checkpoints, ``mvtcae evaluate``, the MLflow pyfunc), so there the list comes
from the environment variable ``MVTCAE_TRUSTED_MODULES`` (comma-separated module names) plus
whatever the entry point adds (``--trust-module``, the pyfunc's ``model_config``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from mvtcae.model.persistence import TRUST_ENV_VAR


def platform_trusted_modules(extra: Iterable[str] | None = None) -> list[str]:
    """Module names from ``MVTCAE_TRUSTED_MODULES`` followed by ``extra``, without duplicates."""
    if isinstance(extra, str):
        # A bare string would be read character by character: refuse rather than guess.
        raise TypeError(f"extra trusted modules must be a list of names, not {extra!r}")
    names: list[str] = []
    for name in [*os.environ.get(TRUST_ENV_VAR, "").split(","), *(extra or ())]:
        name = name.strip()
        if name and name not in names:
            names.append(name)
    return names
