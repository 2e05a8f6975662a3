"""Keeping credentials out of what the platform writes: params, tags, files, summaries, logs.

A tracking URI (``http://user:password@host``), an Optuna storage URL
(``postgresql://user:password@host/db``) or a URI with secret query parameters
(``?secret_key=…``) may legitimately carry a credential in memory, where a client needs it. Every
place that writes such a value somewhere a person or another program can read it passes it
through :func:`redact` first. This module depends only on the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# scheme://userinfo@ — the userinfo runs to the last "@" of the authority, so a password that
# itself contains "@" is masked whole.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s?#]*)@")
_SECRET_QUERY = re.compile(
    r"(?i)(?P<key>[?&;](?:password|passwd|pwd|secret|secret_key|secret_access_key|access_key|"
    r"session_token|token|api_key|apikey|sig|signature|credentials?)=)[^&;#\s]*"
)


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    if ":" not in userinfo:
        return match.group(0)  # a user name alone is not a secret
    user = userinfo.split(":", 1)[0]
    return f"{match.group('scheme')}{user}:{MASK}@"


def redact_text(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` and the value of every
    secret query parameter replaced by ``***``."""
    return _SECRET_QUERY.sub(lambda m: m.group("key") + MASK, _USERINFO.sub(_mask_userinfo, text))


def redact(value: Any) -> Any:
    """A copy of ``value`` (str, or nested dicts/lists/tuples of them) with credentials masked."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact(item) for item in value)
    return value


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """``(uri without userinfo, user, password)`` of a URL; user/password None when absent."""
    match = _USERINFO.match(uri)
    if match is None:
        return uri, None, None
    userinfo = match.group("userinfo")
    user, sep, password = userinfo.partition(":")
    public = match.group("scheme") + uri[match.end() :]
    return public, user or None, password if sep else None
