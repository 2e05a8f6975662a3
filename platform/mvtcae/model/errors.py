"""The two ways a command ends early without a bug: `UserError`, the base of every error in what
a user gave the platform (a config value, a file, a dataset, a name, a model directory, a
request that cannot fit), and `Interrupted`, a signal to stop. The command line prints either
as one line, without a traceback (``--verbose`` shows it), and exits non-zero.

They live at the bottom layer so that every package, the model included, can raise them.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """Something the user gave is wrong or missing; the message names the file, field, option or
    modality at fault and what to change."""


class Interrupted(KeyboardInterrupt):
    """The command was asked to stop: SIGINT (Ctrl-C) or SIGTERM (``kill``, ``ray job stop``,
    a scheduler's preemption). A KeyboardInterrupt, so that everything that cleans up after
    Ctrl-C cleans up after it; ``run`` names the run it ended, when one was open."""

    def __init__(self, signum: int, run: str | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run = run

    @property
    def signal_name(self) -> str:
        """SIGINT or SIGTERM."""
        return str(self.args[0])

    @property
    def exit_code(self) -> int:
        """The shell's status for a process ended by this signal (130 for SIGINT)."""
        return 128 + self.signum
