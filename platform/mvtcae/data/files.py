"""Where a dataset lives: a local directory or an object-store prefix, read through pyarrow.

A dataset location is what ``data.dir`` holds: a local path, a ``file://`` URI, or a URI that
pyarrow's file systems open (``s3://bucket/prefix``, ``gs://bucket/prefix``). Local locations
keep local rules (paths resolved, symlinks followed and contained); object-store locations are
read in place, file by file, with no local copy. Credentials never belong in a location (see
``mvtcae.config.locations``); the stores read them from the environment.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mvtcae.config.locations import CredentialsInLocationError, local_path, normalize
from mvtcae.config.locations import resolve as resolve_location
from mvtcae.model.errors import UserError
from mvtcae.safety.names import UnsafeNameError, check_relative_path, path_inside

HASH_CHUNK_BYTES = 4 * 2**20
MANIFEST_FILE = "manifest.json"


def sha256_file(path: str | os.PathLike, fs: pafs.FileSystem | None = None) -> str:
    """Hex SHA-256 of a file's bytes (on ``fs``, the local file system by default), streamed in
    chunks: constant memory, whatever the store."""
    digest = hashlib.sha256()
    with (fs or pafs.LocalFileSystem()).open_input_stream(os.fspath(path)) as stream:
        while chunk := stream.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class DatasetError(UserError, ValueError):
    """A dataset directory does not match its manifest or holds bad values."""


@dataclass(frozen=True)
class FileStamp:
    """What says a file is unchanged without reading it: its size and modification time."""

    size: int
    mtime_ns: int


class DatasetFiles:
    """The files of one dataset location: their paths, reads, checksums and listing."""

    def __init__(self, location: str | os.PathLike[str]) -> None:
        text = os.fspath(location)
        try:
            normalized = normalize(text)
        except CredentialsInLocationError as err:
            raise DatasetError(str(err)) from err
        except ValueError as err:
            raise DatasetError(f"dataset location: {err}") from err
        local = local_path(normalized)
        self.is_local = local is not None
        self.location = str(Path(local).resolve()) if local is not None else normalized
        """Local: the absolute directory; elsewhere: the normalised URI (safe to show)."""
        if self.is_local:
            self.fs: pafs.FileSystem = pafs.LocalFileSystem()
            self.root = self.location
        else:
            try:
                self.fs, self.root = resolve_location(normalized)
            except (OSError, ValueError) as err:
                raise DatasetError(f"{normalized}: cannot open its file system ({err})") from err

    def __str__(self) -> str:
        return self.location

    def show(self, relative: str = "") -> str:
        """A file's location for messages (``s3://bucket/prefix/train/part-00000.parquet``)."""
        if not relative:
            return self.location
        if self.is_local:
            return str(Path(self.location, relative))
        head, sep, query = self.location.partition("?")
        return f"{head}/{relative}{sep}{query}"

    def path(self, relative: str, what: str = "file") -> str:
        """The path on ``fs`` of a file named relative to the dataset root; DatasetError if the
        name would leave the dataset (``..``, absolute, or a local symlink out of it)."""
        try:
            if self.is_local:
                return str(path_inside(self.root, relative, what))
            check_relative_path(relative, what)
        except UnsafeNameError as err:
            raise DatasetError(f"{self.show(MANIFEST_FILE)}: {err}") from err
        return posixpath.join(self.root, relative)

    def is_file(self, relative: str) -> bool:
        """Whether the file exists (and, locally, stays inside the dataset)."""
        return self.fs.get_file_info(self.path(relative)).type == pafs.FileType.File

    def read_bytes(self, relative: str) -> bytes:
        """The bytes of a file; FileNotFoundError when it is absent."""
        path = self.path(relative)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(self.show(relative))
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def read_text(self, relative: str) -> str:
        """The UTF-8 text of a file; FileNotFoundError when it is absent."""
        return self.read_bytes(relative).decode("utf-8")

    def sha256(self, relative: str) -> str:
        """SHA-256 of a file of the dataset, streamed through its file system."""
        return sha256_file(self.path(relative), self.fs)

    def parquet(self, relative: str) -> pq.ParquetFile:
        """A Parquet file opened for reading (only the footer is read until asked for rows)."""
        return pq.ParquetFile(self.fs.open_input_file(self.path(relative)))

    def list_files(self, suffix: str) -> dict[str, FileStamp]:
        """Every file under the root whose name ends in ``suffix``: relative POSIX name ->
        stamp (one listing call on an object store)."""
        if self.is_local:
            # rglob does not descend into symlinked directories; a linked file is checked apart.
            root = Path(self.root)
            found = {}
            for file in root.rglob(f"*{suffix}"):
                stat = file.stat()
                found[file.relative_to(root).as_posix()] = FileStamp(stat.st_size, stat.st_mtime_ns)
            return found
        selector = pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        return {
            info.path.removeprefix(prefix): FileStamp(int(info.size), int(info.mtime_ns or 0))
            for info in self.fs.get_file_info(selector)
            if info.type == pafs.FileType.File and info.path.endswith(suffix)
        }


def dataset_files(location: str | os.PathLike[str] | DatasetFiles) -> DatasetFiles:
    """``location`` as DatasetFiles (returned as is when it already is one)."""
    return location if isinstance(location, DatasetFiles) else DatasetFiles(location)
