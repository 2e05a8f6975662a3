"""The entry of the scripts that ``ray job submit`` runs (``jobs/train.py``, ``jobs/tune.py``):
a command of the ``mvtcae`` tree, with a default config, and the command's options as they are."""

from __future__ import annotations

import sys
from pathlib import Path

import click


def run_as_job(
    command: click.Command, default_config: Path, prog_name: str, argv: list[str] | None = None
) -> None:
    """Run ``command`` on ``argv`` (default: the process's arguments), with ``--config
    default_config`` unless a ``--config`` is given; exits as the command does."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--config" or a.startswith("--config=") for a in args):
        args = ["--config", str(default_config), *args]
    command.main(args=args, prog_name=prog_name, standalone_mode=True)
