"""The ``mvtcae`` command: thin click wrappers over the platform's packages.

``mvtcae train | tune | evaluate | data | cluster``; each command validates its config at the
boundary and calls one function of the package that owns the work. Where only the model library
is installed (no ``platform`` extra), ``main`` says which extra the command needs instead of
failing with a traceback.
"""

from __future__ import annotations

from typing import Any

PLATFORM_EXTRA_HINT = "pip install 'mvtcae-platform[platform]'"

try:
    from mvtcae.cli.tree import main
except ModuleNotFoundError as err:
    if (err.name or "").partition(".")[0] == "mvtcae":
        raise  # our own code is broken: show it
    _missing = err.name

    def main(*args: Any, **kwargs: Any) -> None:  # type: ignore[misc]
        """Stand-in for the command where the platform is not installed."""
        raise SystemExit(
            f"mvtcae: the command line needs the platform ({_missing} is not installed): "
            f"{PLATFORM_EXTRA_HINT}"
        )


__all__ = ["PLATFORM_EXTRA_HINT", "main"]
