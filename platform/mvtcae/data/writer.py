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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pydantic import ValidationError

from mvtcae.config.locations import basename
from mvtcae.data.files import MANIFEST_FILE, DatasetFiles, sha256_file
from mvtcae.data.format import (
    ID_COLUMN,
    LABEL_COLUMN,
    PRESENT_SUFFIX,
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
class SplitArrays:
    """One split held in memory: modality -> (n, *shape) array, optional masks and labels."""

    data: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] | None = None
    labels: np.ndarray | None = None
    ids: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        """Number of samples in the split."""
        return int(next(iter(self.data.values())).shape[0])


def as_split_arrays(value: SplitArrays | Mapping) -> SplitArrays:
    """Accept a SplitArrays or a dict with ``data`` (and optional ``masks``, ``labels``, ``ids``).

    A plain mapping of modality -> array (no ``data`` key) is taken as fully observed data.
    """
    if isinstance(value, SplitArrays):
        return value
    if "data" in value:
        return SplitArrays(
            data=dict(value["data"]),
            masks=None if value.get("masks") is None else dict(value["masks"]),
            labels=value.get("labels"),
            ids=value.get("ids"),
        )
    return SplitArrays(data={k: np.asarray(v) for k, v in value.items()})


def random_presence(
    num_rows: int, modalities: Iterable[str], missing_ratio: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Presence masks where each modality is absent with probability ``missing_ratio``.

    A row that would lose every modality gets one modality, chosen uniformly, back, so the
    realised missing fraction is ``r - r**M / M`` for M modalities.
    """
    names = list(modalities)
    if not 0.0 <= missing_ratio < 1.0:
        raise ValueError(f"missing_ratio must be in [0, 1), got {missing_ratio}")
    present = rng.random((num_rows, len(names))) >= missing_ratio
    empty = ~present.any(axis=1)
    present[np.flatnonzero(empty), rng.integers(0, len(names), size=int(empty.sum()))] = True
    return {name: present[:, j].copy() for j, name in enumerate(names)}


def infer_modality_spec(name: str, array: np.ndarray) -> ModalitySpec:
    """Stored dtype and defaults for a user array: uint8 stays uint8 (an image in [0, 1]
    after dividing by 255, Laplace decoder), other numbers are stored as float32 (Normal)."""
    shape = tuple(int(d) for d in array.shape[1:])
    if not shape:
        raise DatasetError(f"modality {name!r}: array has shape {array.shape}; need (n, *shape)")
    if array.dtype == np.uint8:
        kind = "image" if len(shape) in (2, 3) else "tensor"
        return ModalitySpec(
            shape=shape, dtype="uint8", distribution="laplace", transform="divide_255", kind=kind
        )
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.number):
        kind = "vector" if len(shape) == 1 else "tensor"
        return ModalitySpec(shape=shape, dtype="float32", distribution="normal", kind=kind)
    raise DatasetError(f"modality {name!r}: dtype {array.dtype} is not numeric")


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
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)  # fmt: skip


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


def write_arrays(
    out_dir: str | os.PathLike,
    splits: Mapping[str, SplitArrays | Mapping],
    *,
    name: str | None = None,
    modalities: Mapping[str, ModalitySpec] | None = None,
    num_classes: int | None = None,
    rows_per_shard: int | None = None,
    overwrite: bool = False,
    description: str = "",
    preprocessing: dict | None = None,
    source: dict | None = None,
) -> Manifest:
    """Write in-memory splits (``{"train": {"data": {m: (n, *shape)}, "masks": {m: (n,)},
    "labels": (n,)}, ...}``) as a dataset directory and return its manifest.

    Modality specs are inferred from the first split's arrays unless given; ``num_classes``
    defaults to ``max(label) + 1`` when labels are given.
    """
    parts = {split: as_split_arrays(value) for split, value in splits.items()}
    if not parts:
        raise DatasetError("no splits given")
    first = next(iter(parts.values()))
    specs = dict(modalities or {m: infer_modality_spec(m, a) for m, a in first.data.items()})
    has_labels = _labels_consistent(parts)
    if has_labels and num_classes is None:
        num_classes = int(max(np.max(p.labels) for p in parts.values() if len(p.labels))) + 1
    if name is None:
        name = basename(DatasetFiles(out_dir).location)
        where = f"{out_dir} (no name given, so the directory's name is the dataset name)"
        checked_name(name, "dataset name", where)
    with DatasetWriter(
        out_dir,
        name=name,
        modalities=specs,
        num_classes=num_classes,
        has_labels=has_labels,
        rows_per_shard=rows_per_shard,
        overwrite=overwrite,
        description=description,
        preprocessing=preprocessing,
        source=source,
    ) as writer:
        for split, part in parts.items():
            writer.add(split, part.data, part.masks, part.labels, part.ids)
    return writer.manifest


write_dataset_from_arrays = write_arrays
"""Alias of ``write_arrays``."""


def _labels_consistent(parts: Mapping[str, SplitArrays]) -> bool:
    with_labels = {split for split, p in parts.items() if p.labels is not None}
    if with_labels and with_labels != set(parts):
        missing = sorted(set(parts) - with_labels)
        raise DatasetError(f"labels given for some splits but not for {missing}")
    return bool(with_labels)


def read_npz_splits(path: str | os.PathLike) -> dict[str, SplitArrays]:
    """Read user arrays from a ``.npz``: keys ``SPLIT/MODALITY``, ``SPLIT/MODALITY__present``,
    ``SPLIT/label`` and ``SPLIT/sample_id``; keys without ``SPLIT/`` belong to split ``train``.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path, allow_pickle=False) as archive:
        for key in archive.files:
            split, column = _npz_key(path, key)
            grouped.setdefault(split, {})[column] = archive[key]
    if not grouped:
        raise DatasetError(f"{path}: the archive holds no arrays")
    return {split: _columns_to_split(path, split, cols) for split, cols in grouped.items()}


def _npz_key(path: str | os.PathLike, key: str) -> tuple[str, str]:
    """(split, column) of an archive key ``SPLIT/COLUMN``, or (``train``, key) without a split.

    The split becomes a shard directory, so both parts must be safe names.
    """
    if key.count("/") > 1:
        raise DatasetError(
            f"{path}: array key {key!r} has more than one '/'; use SPLIT/COLUMN or COLUMN"
        )
    split, slash, column = key.partition("/")
    if not slash:
        split, column = "train", key
    where = f"{path}: array key {key!r}"
    return checked_name(split, "split name", where), checked_name(column, "column name", where)


def _columns_to_split(path: str | os.PathLike, split: str, cols: dict) -> SplitArrays:
    labels = cols.pop(LABEL_COLUMN, None)
    ids = cols.pop(ID_COLUMN, None)
    masks = {
        c.removesuffix(PRESENT_SUFFIX): cols.pop(c)
        for c in list(cols)
        if c.endswith(PRESENT_SUFFIX)
    }
    if not cols:
        raise DatasetError(f"{path}: split {split!r} has no modality arrays")
    unknown = set(masks) - set(cols)
    if unknown:
        raise DatasetError(f"{path}: split {split!r} has masks for unknown {sorted(unknown)}")
    return SplitArrays(data=cols, masks=masks or None, labels=labels, ids=ids)


def split_off_test(
    part: SplitArrays, test_fraction: float, rng: np.random.Generator
) -> dict[str, SplitArrays]:
    """Split one SplitArrays into ``train`` and ``test`` by a random permutation of rows."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = rng.permutation(part.num_rows)
    n_test = max(1, int(round(test_fraction * part.num_rows)))
    pick = {"test": np.sort(order[:n_test]), "train": np.sort(order[n_test:])}
    return {split: _take(part, rows) for split, rows in pick.items()}


def _take(part: SplitArrays, rows: np.ndarray) -> SplitArrays:
    return SplitArrays(
        data={m: a[rows] for m, a in part.data.items()},
        masks=None if part.masks is None else {m: a[rows] for m, a in part.masks.items()},
        labels=None if part.labels is None else part.labels[rows],
        ids=np.asarray(part.ids)[rows] if part.ids is not None else rows.astype(np.int64),
    )


def write_dataset_from_npz(
    npz_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    test_fraction: float | None = None,
    missing_ratio: float = 0.0,
    seed: int = 0,
    **kwargs,
) -> Manifest:
    """Turn a user's ``.npz`` (see ``read_npz_splits``) into a dataset directory.

    ``test_fraction`` splits a single-split archive into train/test; ``missing_ratio`` > 0
    draws presence masks (combined with any masks in the archive).
    """
    parts = read_npz_splits(npz_path)
    rng = np.random.default_rng(seed)
    if test_fraction is not None:
        if len(parts) != 1:
            raise DatasetError(f"{npz_path}: test_fraction needs a single split, has {list(parts)}")
        parts = split_off_test(next(iter(parts.values())), test_fraction, rng)
    if missing_ratio > 0:
        parts = {s: with_missing(p, missing_ratio, rng) for s, p in parts.items()}
    kwargs.setdefault("source", {"npz": str(Path(npz_path).resolve())})
    return write_arrays(out_dir, parts, **kwargs)


def with_missing(part: SplitArrays, missing_ratio: float, rng: np.random.Generator) -> SplitArrays:
    """Return ``part`` with random presence masks (AND-ed with its own masks, if any)."""
    drawn = random_presence(part.num_rows, part.data, missing_ratio, rng)
    if part.masks:
        drawn = {m: drawn[m] & np.asarray(part.masks.get(m, True), bool) for m in drawn}
        empty = ~np.stack(list(drawn.values()), axis=1).any(axis=1)
        if empty.any():  # keep one modality the user had observed
            for m in part.data:
                own = np.asarray(part.masks.get(m, np.ones(part.num_rows, bool)), bool)
                fix = empty & own
                drawn[m] |= fix
                empty &= ~fix
    return SplitArrays(data=part.data, masks=drawn, labels=part.labels, ids=part.ids)
