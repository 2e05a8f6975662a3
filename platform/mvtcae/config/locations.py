"""Run-storage locations as strings: what a valid one looks like, checked at the config boundary.

A location is an absolute local path or a URI that pyarrow's file systems open (``s3://``,
``gs://``, ``file://``, ``hdfs://``, ...). The checks are pure string logic, so configuration
can validate locations without touching a file system; ``resolve`` names the file system that
opens one, for the layers that do the I/O (``mvtcae.data`` for datasets, ``mvtcae.storage`` for
runs).
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import pyarrow.fs as pafs

from mvtcae.model.errors import UserError
from mvtcae.safety.redaction import redact_text

URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
SECRET_QUERY_KEYS = frozenset({"access_key", "secret_key", "session_token", "password"})


class CredentialsInLocationError(UserError, ValueError):
    """A location with credentials written into it; its message never repeats the location."""


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path."""
    return "://" in str(location)


def normalize(location: str | os.PathLike[str]) -> str:
    """The canonical form of a location: local paths made absolute, URIs checked.

    Raises ValueError naming the location when its scheme is not a file system, a ``file://``
    path is relative, a bucket is missing, or credentials are written into it.
    """
    text = str(location).strip()
    if not text:
        raise ValueError("storage location is empty")
    if not is_uri(text):
        return str(Path(text).expanduser().resolve())
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    path, sep, query = rest.partition("?")
    _refuse_credentials(text, path.split("/", 1)[0], query)
    if scheme not in URI_SCHEMES:
        raise ValueError(
            f"{redact_text(text)!r}: unsupported storage scheme {scheme!r}; use a local path or "
            "one of " + ", ".join(f"{s}://" for s in URI_SCHEMES)
        )
    if scheme == "file":
        if not path.startswith("/"):
            raise ValueError(f"{text!r}: file:// needs an absolute path, e.g. file:///mnt/runs")
        path = posixpath.normpath(path)
    elif not path.strip("/"):
        raise ValueError(f"{text!r}: no bucket or host after {scheme}://")
    else:
        path = path.rstrip("/")
    return f"{scheme}://{path}{sep}{query}"


def _refuse_credentials(text: str, authority: str, query: str) -> None:
    secrets = sorted(k for k, _ in parse_qsl(query) if k.lower() in SECRET_QUERY_KEYS)
    if secrets or ("@" in authority and ":" in authority.split("@", 1)[0]):
        where = ", ".join(secrets) if secrets else "user:password@"
        shown = text.split("://", 1)[0] + "://…"
        raise CredentialsInLocationError(
            f"{shown}: credentials ({where}) must not be written into a storage location; "
            "pass them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
            "GOOGLE_APPLICATION_CREDENTIALS) or an instance/workload identity"
        )


def join(location: str, *parts: str) -> str:
    """``location`` with path components appended (a URI keeps its query parameters)."""
    if not is_uri(location):
        return str(Path(location).joinpath(*parts))
    head, sep, query = location.partition("?")
    pieces = [head.rstrip("/"), *(p.strip("/") for p in parts if p.strip("/"))]
    return "/".join(pieces) + sep + query


def basename(location: str) -> str:
    """The last path component of a location."""
    if is_uri(location):
        return posixpath.basename(location.partition("?")[0].rstrip("/"))
    return Path(location).name


def cache_root() -> Path:
    """Where the platform keeps its caches (validation records, coherence classifiers):
    ``$MVTCAE_CACHE_DIR``, else ``~/.cache/mvtcae``."""
    base = os.environ.get("MVTCAE_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "mvtcae"


def local_path(location: str | os.PathLike[str]) -> str | None:
    """The local path of a plain path or ``file://`` URI; None for every other URI."""
    text = os.fspath(location)
    if not is_uri(text):
        return text
    parsed = urlparse(text)
    return parsed.path if parsed.scheme == "file" else None


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow file system of a location and the location's path on it.

    Object stores read credentials and endpoints from the environment (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ...) or from the URI's query (``?endpoint_override=host:9000``).
    """
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location))
    return pafs.FileSystem.from_uri(location)
