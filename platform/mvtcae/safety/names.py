"""Names and relative paths that come from data or configs, checked before they touch a disk.

A split, dataset, modality or run name becomes a path component somewhere (a shard
directory, a cache file), and a manifest lists shard files relative to its directory. These
checks keep every such value inside the directory it is meant for: names use a small safe
character set, relative paths are made of such names, and ``path_inside`` verifies the
resolved result (symlinks included) against its root.

This module depends only on the standard library so any layer can use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mvtcae.model.errors import UserError

MAX_NAME_LENGTH = 128
ALLOWED = (
    f"1-{MAX_NAME_LENGTH} characters from A-Z a-z 0-9 _ . -, starting with a letter or digit, "
    "without '..'"
)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class UnsafeNameError(UserError, ValueError):
    """A name or relative path could reach outside its directory, or uses unsafe characters."""


def _name_problem(value: str) -> str | None:
    """Why ``value`` is not a safe name, or None when it is one."""
    if not isinstance(value, str):
        return f"it is a {type(value).__name__}, not a string"
    if not value:
        return "it is empty"
    if "\x00" in value:
        return "it contains a NUL character"
    if value.startswith(("/", "\\")):
        return "it is an absolute path"
    if ".." in value:
        return "it contains '..'"
    if "/" in value or "\\" in value:
        return "it contains a path separator"
    if len(value) > MAX_NAME_LENGTH:
        return f"it is {len(value)} characters long"
    if not _SAFE_NAME.fullmatch(value):
        return "it uses characters outside the safe set or does not start with a letter or digit"
    return None


def _refuse(what: str, value: object, problem: str) -> UnsafeNameError:
    return UnsafeNameError(f"{what} {value!r} is not allowed ({problem}): use {ALLOWED}")


def check_name(value: str, what: str) -> str:
    """Return ``value`` if it is a safe single path component, else raise UnsafeNameError.

    Safe means 1-128 characters from ``[A-Za-z0-9_.-]``, starting with a letter or digit and
    without ``..``; ``what`` (e.g. ``"split name"``) starts the error message.
    """
    problem = _name_problem(value)
    if problem is not None:
        raise _refuse(what, value, problem)
    return value


def check_relative_path(value: str, what: str, *, suffix: str | None = None) -> str:
    """Return ``value`` if it is a POSIX relative path of safe names, else raise UnsafeNameError.

    Every ``/``-separated component must pass ``check_name``, which rules out absolute paths,
    ``..``, ``.``, empty components and backslashes; with ``suffix`` the path must end in it.
    """
    if not isinstance(value, str) or not value:
        raise _refuse(what, value, "it is empty" if value == "" else "it is not a string")
    if value.startswith(("/", "\\")):
        raise _refuse(what, value, "it is an absolute path")
    for part in value.split("/"):
        problem = _name_problem(part)
        if problem is not None:
            raise _refuse(what, value, f"component {part!r}: {problem}")
    if suffix is not None and not value.endswith(suffix):
        raise _refuse(what, value, f"it does not end with {suffix!r}")
    return value


def path_inside(root: str | os.PathLike, relative: str, what: str) -> Path:
    """``root / relative`` fully resolved, checked to lie strictly inside the resolved ``root``.

    Resolving follows symlinks, so a link inside ``root`` that points elsewhere is refused
    just like ``..`` or an absolute ``relative``.
    """
    base = Path(root).resolve()
    # An empty or absolute ``relative`` would name the root itself or replace it entirely.
    if not relative or Path(relative).is_absolute():
        raise UnsafeNameError(f"{what} {relative!r} is not a path inside {str(base)!r}")
    target = (base / relative).resolve()
    if target == base or not target.is_relative_to(base):
        raise UnsafeNameError(
            f"{what} {relative!r} resolves to {str(target)!r}, outside {str(base)!r}"
        )
    return target
