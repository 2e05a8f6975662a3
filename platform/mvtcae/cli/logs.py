"""The platform's own log lines on the command's stderr (``[mvtcae.<package>] ...``)."""

from __future__ import annotations

import logging
import sys


def configure_logging(level: int = logging.INFO) -> None:
    """Show the platform's log lines (``[mvtcae.<package>] ...``) on stderr, once."""
    package = logging.getLogger("mvtcae")
    if any(getattr(h, "name", "") == "mvtcae-cli" for h in package.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.name = "mvtcae-cli"
    handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s %(message)s"))
    package.addHandler(handler)
    package.setLevel(level)
