"""Run storage: where training and sweeps keep run state, checkpoints and evaluation output.

A *location* is a string naming a directory: an absolute local path
(``/mnt/shared/ray_results``) or a URI that ``pyarrow.fs.FileSystem.from_uri`` opens
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/dir``, ``hdfs://host/dir``).
Query parameters such as ``?endpoint_override=minio:9000&scheme=http`` stay part of the
location, so Ray Train and Tune, which take the same strings as ``RunConfig(storage_path=...)``,
see exactly what this module sees. Credentials never belong in a location: object stores read
them from the environment (``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, instance
roles, workload identity).
"""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from mvtcae.config.locations import (
    URI_SCHEMES,
    CredentialsInLocationError,
    basename,
    is_uri,
    join,
    normalize,
    resolve,
)

__all__ = [
    "URI_SCHEMES",
    "CredentialsInLocationError",
    "basename",
    "is_file",
    "is_uri",
    "join",
    "list_dirs",
    "local_directory",
    "location_of",
    "normalize",
    "read_text",
    "resolve",
    "staged_directory",
    "upload_directory",
    "write_text",
]


def location_of(root: str, fs_path: str) -> str:
    """The location of ``fs_path`` (a path on ``root``'s file system, e.g. a Ray
    ``Checkpoint.path``) written in the same form as ``root``."""
    if not is_uri(root):
        return str(Path(fs_path))
    _, root_path = resolve(root)
    relative = posixpath.relpath(posixpath.normpath(fs_path), posixpath.normpath(root_path))
    if relative == ".." or relative.startswith("../"):
        raise ValueError(f"{fs_path!r} is not under storage location {root!r}")
    return root if relative == "." else join(root, relative)


def is_file(location: str) -> bool:
    """Whether a file exists at ``location``."""
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def read_text(location: str) -> str:
    """The UTF-8 text of the file at ``location``."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


def write_text(location: str, text: str) -> None:
    """Write a file whole: readers see the old content or the new one, never a part."""
    if not is_uri(location):
        target = Path(location)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", encoding="utf-8", dir=target.parent, prefix=f".{target.name}.", delete=False
        ) as tmp:
            tmp.write(text)
        os.replace(tmp.name, target)
        return
    fs, path = resolve(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as stream:  # object stores publish on close
        stream.write(text.encode("utf-8"))


def list_dirs(location: str) -> list[str]:
    """Names of the directories directly under ``location`` (empty when it does not exist)."""
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    selector = pafs.FileSelector(path, allow_not_found=True)
    return sorted(
        posixpath.basename(info.path.rstrip("/"))
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.Directory
    )


@contextmanager
def local_directory(location: str, files: Collection[str] | None = None) -> Iterator[Path]:
    """A local directory with the contents of ``location``: itself when local, else a
    temporary download that is removed on exit.

    ``files`` limits a download to those top-level files (absent ones are skipped), e.g. a
    checkpoint's model files without its optimizer state.
    """
    if not is_uri(location):
        if not Path(location).is_dir():
            raise FileNotFoundError(f"{location}: no such directory")
        yield Path(location)
        return
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{location}: no such directory")
    local_fs = pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="mvtcae-download-") as tmp:
        if files is None:
            pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=local_fs)
        else:
            wanted = [posixpath.join(path, name) for name in files]
            for info in fs.get_file_info(wanted):
                if info.type == pafs.FileType.File:
                    target = os.path.join(tmp, info.base_name)
                    pafs.copy_files(
                        info.path, target, source_filesystem=fs, destination_filesystem=local_fs
                    )
        yield Path(tmp)


def upload_directory(local_dir: str | Path, location: str) -> None:
    """Copy a local directory's contents to ``location``."""
    fs, path = resolve(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(
        str(local_dir), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


@contextmanager
def staged_directory(location: str) -> Iterator[Path]:
    """A local directory whose contents end up at ``location``: the location itself when local,
    else a temporary directory uploaded when the block exits without an error."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="mvtcae-stage-") as tmp:
        yield Path(tmp)
        upload_directory(tmp, location)
