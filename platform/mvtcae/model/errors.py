"""The base of every error in what a user gave the platform (a config value, a file, a dataset,
a name, a model directory, a request that cannot fit): the command line prints its message as
one line, without a traceback (``mvtcae --verbose`` shows it), and exits non-zero.

It lives at the bottom layer so that every package, the model included, can raise one.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave is wrong or missing; the message names the file, field, option or
    modality at fault and what to change."""
