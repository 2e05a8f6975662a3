"""Writing arrays into shards with a manifest, atomically.

Every dataset is written into a hidden staging directory beside the target
(``.NAME.tmp-XXXX``), the manifest last, and only then renamed into place: an interrupted
or failed write leaves no directory at the target path that could validate. A target on an
object store (``s3://bucket/prefix``) is staged locally and uploaded shards first, manifest
last (see ``DatasetWriter._upload``).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from mvtcae.data.files import MANIFEST_FILE, DatasetFiles, sha256_file
from mvtcae.data.format import (
    ID_COLUMN,
    LABEL_COLUMN,
    SHARD_SUFFIX,
    DatasetError,
    Manifest,
    ModalitySpec,
    ShardSpec,
    SplitSpec,
    checked_name,
    dataset_file,
    describe_errors,
    presence_column,
    save_manifest,
)

DEFAULT_SHARD_BYTES = 16 * 2**20
"""Target uncompressed shard size: also the largest block Ray Data makes from one shard."""
SHARD_COMPRESSION = "lz4"
TENSOR_ENCODING = "BYTE_STREAM_SPLIT"
"""Parquet stores uint8 as 4-byte INT32: splitting the byte streams lets LZ4 drop the three
zero bytes (uint8 shards end up about raw size) and decodes 5-10x faster than zstd."""


@dataclass
class _SplitState:
    """Rows buffered for the next shard of one split, and the shards already written."""

    buffered: list[pa.Table] = field(default_factory=list)
    buffered_rows: int = 0
    shards: list[ShardSpec] = field(default_factory=list)
    num_rows: int = 0
    present_rows: dict[str, int] = field(default_factory=dict)
    next_id: int = 0


class DatasetWriter:
    """Writes chunks of rows into shards in a staging directory; ``commit`` publishes them.

    Use as a context manager: leaving the block by an exception removes the staging
    directory, leaving it normally commits (manifest, then rename onto ``out_dir``).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        name: str,
        modalities: Mapping[str, ModalitySpec],
        num_classes: int | None = None,
        has_labels: bool = False,
        rows_per_shard: int | None = None,
        overwrite: bool = False,
        description: str = "",
        preprocessing: dict | None = None,
        source: dict | None = None,
    ) -> None:
        self.target = DatasetFiles(out_dir)
        self.out_dir: str | Path = (
            Path(self.target.location) if self.target.is_local else self.target.location
        )
        """Where the dataset ends up: a local Path, or the URI of an object-store prefix."""
        # Checked before anything touches the disk; the manifest below would refuse it too.
        checked_name(name, "dataset name", self.out_dir)
        if not overwrite and self._target_exists():
            raise FileExistsError(f"{self.out_dir} exists; pass overwrite=True to replace it")
        try:
            self.manifest = Manifest(
                name=name,
                description=description,
                modalities=dict(modalities),
                num_classes=num_classes,
                has_labels=has_labels,
                splits={},
                preprocessing=preprocessing or {},
                source=source or {},
            )
        except ValidationError as err:
            raise DatasetError(f"{self.out_dir}: {describe_errors(err)}") from err
        self.schema = self.manifest.arrow_schema()
        self.rows_per_shard = rows_per_shard or max(
            1, DEFAULT_SHARD_BYTES // self.manifest.row_bytes
        )
        self.overwrite = overwrite
        self._splits: dict[str, _SplitState] = {}
        if self.target.is_local:
            # Beside the target, so that publishing is one rename on the same file system.
            target = Path(self.out_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        else:
            self.staging = Path(tempfile.mkdtemp(prefix="mvtcae-dataset-"))
        self._closed = False

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def add(
        self,
        split: str,
        data: Mapping[str, np.ndarray],
        masks: Mapping[str, np.ndarray] | None = None,
        labels: np.ndarray | None = None,
        ids: np.ndarray | None = None,
    ) -> None:
        """Append rows to ``split``; absent modalities are zero-filled in storage.

        ``split`` becomes a directory of the dataset, so it must be a safe name (``train``).
        """
        if split not in self._splits:
            checked_name(split, "split name", self.out_dir)
        state = self._splits.setdefault(split, _SplitState())
        table = self._to_table(split, state, data, masks, labels, ids)
        state.buffered.append(table)
        state.buffered_rows += table.num_rows
        while state.buffered_rows >= self.rows_per_shard:
            self._flush(split, state, self.rows_per_shard)

    def commit(self) -> Manifest:
        """Write the remaining rows and the manifest, then move the dataset into place."""
        if self._closed:
            return self.manifest
        try:
            for split, state in self._splits.items():
                if state.buffered_rows:
                    self._flush(split, state, state.buffered_rows)
                self.manifest.splits[split] = SplitSpec(
                    num_rows=state.num_rows,
                    present_rows=state.present_rows,
                    shards=state.shards,
                )
            if not self.manifest.splits:
                raise DatasetError(f"{self.out_dir}: nothing was written (no rows in any split)")
            self.manifest.created_at = datetime.now(UTC).isoformat(timespec="seconds")
            save_manifest(self.manifest, self.staging)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.manifest

    def abort(self) -> None:
        """Discard everything written so far."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self._closed = True

    def _target_exists(self) -> bool:
        if self.target.is_local:
            return Path(self.out_dir).exists()
        info = self.target.fs.get_file_info(self.target.root)
        return info.type == pafs.FileType.File or bool(self.target.list_files(""))

    def _publish(self) -> None:
        if not self.target.is_local:
            self._upload()
            return
        out_dir = Path(self.out_dir)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(out_dir, old)
        self.staging.chmod(0o755)  # mkdtemp makes it private
        os.rename(self.staging, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _upload(self) -> None:
        """Publish onto an object store, where there is no rename: shards first, the manifest
        last (a dataset without its manifest is not a dataset). Replacing one stages the new
        shards under a hidden sibling prefix first, so a failed upload leaves the old dataset
        whole; only the final swap (delete, server-side move, manifest) touches it."""
        fs, root = self.target.fs, self.target.root
        files = sorted(
            p.relative_to(self.staging).as_posix()
            for p in self.staging.rglob("*")
            if p.is_file() and p.name != MANIFEST_FILE
        )
        replacing = self._target_exists()
        if replacing and not self.overwrite:
            raise FileExistsError(f"{self.out_dir} exists; pass overwrite=True to replace it")
        parent, name = posixpath.split(root.rstrip("/"))
        upload_root = (
            posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}") if replacing else root
        )
        try:
            for relative in files:
                _put(fs, self.staging / relative, posixpath.join(upload_root, relative))
            if replacing:
                with contextlib.suppress(FileNotFoundError):
                    fs.delete_file(posixpath.join(root, MANIFEST_FILE))
                fs.delete_dir_contents(root, missing_dir_ok=True)
                for relative in files:
                    target = posixpath.join(root, relative)
                    fs.create_dir(posixpath.dirname(target), recursive=True)
                    fs.move(posixpath.join(upload_root, relative), target)
            _put(fs, self.staging / MANIFEST_FILE, posixpath.join(root, MANIFEST_FILE))
        except BaseException:
            # Never leave shards that look like a dataset being written; the manifest is absent.
            # A failing clean-up must not hide why the upload failed.
            with contextlib.suppress(OSError):
                fs.delete_dir_contents(upload_root, missing_dir_ok=True)
            raise
        finally:
            if replacing:
                with contextlib.suppress(OSError):
                    fs.delete_dir(upload_root)
            shutil.rmtree(self.staging, ignore_errors=True)

    def _to_table(
        self,
        split: str,
        state: _SplitState,
        data: Mapping[str, np.ndarray],
        masks: Mapping[str, np.ndarray] | None,
        labels: np.ndarray | None,
        ids: np.ndarray | None,
    ) -> pa.Table:
        expected, given = set(self.manifest.modalities), set(data)
        if expected != given:
            raise DatasetError(
                f"split {split!r}: modalities {sorted(given)} differ from {sorted(expected)}"
            )
        sizes = {m: int(np.shape(a)[0]) if np.ndim(a) else 0 for m, a in data.items()}
        if len(set(sizes.values())) != 1:
            raise DatasetError(f"split {split!r}: modalities disagree on row count: {sizes}")
        n = next(iter(sizes.values()))
        columns: dict[str, pa.Array] = {ID_COLUMN: pa.array(self._ids(split, state, n, ids))}
        if self.manifest.has_labels:
            columns[LABEL_COLUMN] = pa.array(self._labels(split, n, labels))
        elif labels is not None:
            raise DatasetError(f"split {split!r}: labels given but the dataset has none")
        presence = self._presence(split, state, n, masks)
        for name, spec in self.manifest.modalities.items():
            present = presence[name]
            values = _stored_values(split, name, spec, data[name], present, n)
            columns[name] = pa.FixedShapeTensorArray.from_numpy_ndarray(values)
            columns[presence_column(name)] = pa.array(present, type=pa.bool_())
            state.present_rows[name] = state.present_rows.get(name, 0) + int(present.sum())
        return pa.Table.from_pydict(columns, schema=self.schema)

    def _ids(self, split: str, state: _SplitState, n: int, ids: np.ndarray | None) -> np.ndarray:
        if ids is None:
            out = np.arange(state.next_id, state.next_id + n, dtype=np.int64)
        else:
            out = _integers(split, ID_COLUMN, ids, n)
        state.next_id = int(out.max()) + 1 if n else state.next_id
        return out

    def _labels(self, split: str, n: int, labels: np.ndarray | None) -> np.ndarray:
        if labels is None:
            raise DatasetError(f"split {split!r}: the dataset has labels but none were given")
        out = _integers(split, LABEL_COLUMN, labels, n)
        k = self.manifest.num_classes
        if k is not None and n and (out.min() < 0 or out.max() >= k):
            bad = int(np.flatnonzero((out < 0) | (out >= k))[0])
            raise DatasetError(
                f"split {split!r}, column {LABEL_COLUMN!r}, row {bad}: label {out[bad]} "
                f"outside [0, {k})"
            )
        return out

    def _presence(
        self, split: str, state: _SplitState, n: int, masks: Mapping[str, np.ndarray] | None
    ) -> dict[str, np.ndarray]:
        unknown = set(masks or {}) - set(self.manifest.modalities)
        if unknown:
            raise DatasetError(f"split {split!r}: masks for unknown modalities {sorted(unknown)}")
        presence = {m: self._mask(split, m, n, masks) for m in self.manifest.modalities}
        empty = ~np.stack(list(presence.values()), axis=1).any(axis=1)
        if empty.any():
            row = state.num_rows + state.buffered_rows + int(np.flatnonzero(empty)[0])
            raise DatasetError(
                f"split {split!r}, presence columns: row {row} has no modality present"
            )
        return presence

    def _mask(
        self, split: str, name: str, n: int, masks: Mapping[str, np.ndarray] | None
    ) -> np.ndarray:
        if masks is None or masks.get(name) is None:
            return np.ones(n, dtype=bool)
        mask = np.asarray(masks[name])
        if mask.shape != (n,):
            raise DatasetError(
                f"split {split!r}, column {presence_column(name)!r}: mask shape {mask.shape}, "
                f"expected ({n},)"
            )
        return mask.astype(bool)

    def _flush(self, split: str, state: _SplitState, rows: int) -> None:
        table = pa.concat_tables(state.buffered)
        head, rest = table.slice(0, rows), table.slice(rows)
        relative = f"{split}/part-{len(state.shards):05d}{SHARD_SUFFIX}"
        path = dataset_file(self.staging, relative, "shard file")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            head,
            path,
            row_group_size=rows,
            compression=SHARD_COMPRESSION,
            use_dictionary=False,
            column_encoding={
                f"{m}.list.element": TENSOR_ENCODING
                for m in self.schema.names
                if m in self.manifest.modalities
            },
        )
        state.shards.append(
            ShardSpec(
                file=relative,
                num_rows=head.num_rows,
                num_bytes=path.stat().st_size,
                sha256=sha256_file(path),
            )
        )
        state.num_rows += head.num_rows
        state.buffered = [rest] if rest.num_rows else []
        state.buffered_rows = rest.num_rows


def _put(fs: pafs.FileSystem, local: Path, path: str) -> None:
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pafs.copy_files(
        str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def _integers(split: str, column: str, values: np.ndarray, n: int) -> np.ndarray:
    values = np.asarray(values)
    if values.shape != (n,):
        raise DatasetError(f"split {split!r}, column {column!r}: shape {values.shape}, want ({n},)")
    is_int = np.issubdtype(values.dtype, np.integer) or values.dtype == np.bool_
    if not is_int and (not np.all(np.isfinite(values)) or np.any(values != np.round(values))):
        raise DatasetError(f"split {split!r}, column {column!r}: values are not integers")
    return values.astype(np.int64)


def _stored_values(
    split: str, name: str, spec: ModalitySpec, array: np.ndarray, present: np.ndarray, n: int
) -> np.ndarray:
    array = np.asarray(array)
    if array.shape != (n, *spec.shape):
        raise DatasetError(
            f"split {split!r}, column {name!r}: shape {array.shape[1:]} where the manifest "
            f"says {spec.shape} (first dimension must be the {n} rows)"
        )
    if spec.dtype == "uint8" and array.dtype != np.uint8:
        raise DatasetError(f"split {split!r}, column {name!r}: dtype {array.dtype}, need uint8")
    values = np.ascontiguousarray(array, dtype=np.dtype(spec.dtype))
    if values.dtype.kind == "f":
        finite = np.isfinite(values.reshape(n, -1)).all(axis=1) | ~present
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise DatasetError(f"split {split!r}, column {name!r}, row {bad}: NaN or Inf")
    if not present.all():
        values = values.copy() if values is array else values
        values[~present] = 0
    return values
