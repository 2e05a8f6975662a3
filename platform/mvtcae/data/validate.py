"""Checking a dataset directory against its manifest, shard by shard, column by column.

Every ``DatasetError`` names the shard file, the column and the first bad row, so a user
can find and fix the offending sample.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mvtcae.data.format import (
    ID_COLUMN,
    LABEL_COLUMN,
    MANIFEST_FILE,
    DatasetError,
    Manifest,
    ModalitySpec,
    ShardSpec,
    dataset_file,
    load_manifest,
    presence_column,
)
from mvtcae.data.writer import sha256_file

ProgressFn = Callable[[str], None]


def validate_dataset(
    path: str | os.PathLike, *, check_values: bool = True, progress: ProgressFn | None = None
) -> Manifest:
    """Check the dataset directory ``path`` and return its manifest; raise ``DatasetError``.

    Checks the manifest, missing or extra shards, checksums, row counts, the Arrow schema
    (columns, tensor shapes, dtypes) and, with ``check_values``, NaN/Inf, rows with no
    modality present, absent values that are not zero-filled, labels outside
    ``[0, num_classes)`` and duplicate sample ids.
    """
    root = Path(path)
    manifest = load_manifest(root)
    _check_shard_files(root, manifest)
    expected = manifest.arrow_schema()
    for split, spec in manifest.splits.items():
        rows = sum(s.num_rows for s in spec.shards)
        if rows != spec.num_rows:
            raise DatasetError(
                f"{root / MANIFEST_FILE}: split {split!r} lists {rows} shard rows but "
                f"num_rows {spec.num_rows}"
            )
        seen_ids: list[np.ndarray] = []
        for shard in spec.shards:
            if progress:
                progress(shard.file)
            _check_shard(root, manifest, shard, expected, check_values, seen_ids)
        if check_values:
            _check_unique_ids(root, split, spec.shards, seen_ids)
    return manifest


def _check_shard_files(root: Path, manifest: Manifest) -> None:
    listed = {Path(s.file).as_posix() for sp in manifest.splits.values() for s in sp.shards}
    for name in sorted(listed):
        # Resolved and contained: a listed name that is a symlink out of the dataset fails.
        if not dataset_file(root, name, "shard file").is_file():
            raise DatasetError(f"shard {name}: listed in {MANIFEST_FILE} but missing on disk")
    # rglob does not descend into symlinked directories; a linked file is checked above.
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.parquet")}
    extra = sorted(on_disk - listed)
    if extra:
        raise DatasetError(
            f"shard {extra[0]}: present on disk but not listed in {MANIFEST_FILE} "
            f"({len(extra)} extra shard(s)); remove it or rewrite the dataset"
        )


def _check_shard(
    root: Path,
    manifest: Manifest,
    shard: ShardSpec,
    expected: pa.Schema,
    check_values: bool,
    seen_ids: list[np.ndarray],
) -> None:
    path = dataset_file(root, shard.file, "shard file")
    digest = sha256_file(path)
    if digest != shard.sha256:
        raise DatasetError(
            f"shard {shard.file}: checksum mismatch (sha256 {digest[:12]}… where the manifest "
            f"says {shard.sha256[:12]}…): the file changed after it was written"
        )
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"shard {shard.file}: not a readable Parquet file ({err})") from err
    _check_schema(shard.file, parquet.schema_arrow, expected)
    if parquet.metadata.num_rows != shard.num_rows:
        raise DatasetError(
            f"shard {shard.file}: {parquet.metadata.num_rows} rows where the manifest says "
            f"{shard.num_rows}"
        )
    if check_values:
        table = parquet.read()
        _check_values(shard.file, manifest, table)
        seen_ids.append(table.column(ID_COLUMN).to_numpy())


def _check_schema(file: str, actual: pa.Schema, expected: pa.Schema) -> None:
    for field in expected:
        index = actual.get_field_index(field.name)
        if index < 0:
            raise DatasetError(f"shard {file}, column {field.name!r}: missing")
        got = actual.field(index).type
        if got != field.type:
            raise DatasetError(
                f"shard {file}, column {field.name!r}: type {_describe(got)} where the "
                f"manifest says {_describe(field.type)}"
            )
    extra = [name for name in actual.names if expected.get_field_index(name) < 0]
    if extra:
        raise DatasetError(f"shard {file}, column {extra[0]!r}: not in the manifest")


def _describe(arrow_type: pa.DataType) -> str:
    if isinstance(arrow_type, pa.FixedShapeTensorType):
        return f"tensor {arrow_type.value_type} shape {tuple(arrow_type.shape)}"
    return str(arrow_type)


def _check_values(file: str, manifest: Manifest, table: pa.Table) -> None:
    any_present = np.zeros(table.num_rows, dtype=bool)
    for name, spec in manifest.modalities.items():
        present = _column_numpy(file, table, presence_column(name)).astype(bool)
        any_present |= present
        _check_tensor(file, name, spec, table.column(name), present)
    if table.num_rows and not any_present.all():
        bad = int(np.flatnonzero(~any_present)[0])
        columns = ", ".join(presence_column(m) for m in manifest.modalities)
        raise DatasetError(f"shard {file}, columns {columns}, row {bad}: no modality present")
    if manifest.has_labels:
        _check_labels(file, manifest.num_classes, _column_numpy(file, table, LABEL_COLUMN))


def _column_numpy(file: str, table: pa.Table, column: str) -> np.ndarray:
    values = table.column(column)
    if values.null_count:
        bad = _first_null(values)
        raise DatasetError(f"shard {file}, column {column!r}, row {bad}: null value")
    return values.to_numpy()


def _first_null(values: pa.ChunkedArray) -> int:
    return int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])


def tensor_column_numpy(column: pa.ChunkedArray, spec: ModalitySpec) -> np.ndarray:
    """A fixed-shape tensor column as one (n, *shape) array of the stored dtype."""
    chunks = [chunk.storage.flatten().to_numpy(zero_copy_only=False) for chunk in column.chunks]
    flat = np.concatenate(chunks) if chunks else np.empty(0, dtype=spec.dtype)
    return flat.reshape(len(column), *spec.shape)


def _check_tensor(
    file: str, name: str, spec: ModalitySpec, column: pa.ChunkedArray, present: np.ndarray
) -> None:
    if column.null_count:
        raise DatasetError(f"shard {file}, column {name!r}, row {_first_null(column)}: null")
    values = tensor_column_numpy(column, spec).reshape(len(column), -1)
    if values.dtype.kind == "f":
        bad_rows = ~np.isfinite(values).all(axis=1)
        if bad_rows.any():
            bad = int(np.flatnonzero(bad_rows)[0])
            raise DatasetError(f"shard {file}, column {name!r}, row {bad}: NaN or Inf value")
    not_zero = ~present & (values != 0).any(axis=1)
    if not_zero.any():
        bad = int(np.flatnonzero(not_zero)[0])
        raise DatasetError(
            f"shard {file}, column {name!r}, row {bad}: marked absent in "
            f"{presence_column(name)!r} but not zero-filled"
        )


def _check_labels(file: str, num_classes: int | None, labels: np.ndarray) -> None:
    bad_rows = labels < 0
    if num_classes is not None:
        bad_rows |= labels >= num_classes
    if bad_rows.any():
        bad = int(np.flatnonzero(bad_rows)[0])
        raise DatasetError(
            f"shard {file}, column {LABEL_COLUMN!r}, row {bad}: label {labels[bad]} outside "
            f"[0, {num_classes})"
        )


def _check_unique_ids(
    root: Path, split: str, shards: list[ShardSpec], seen: list[np.ndarray]
) -> None:
    if not seen:
        return
    ids = np.concatenate(seen)
    order = np.argsort(ids, kind="stable")
    repeats = order[1:][ids[order][1:] == ids[order][:-1]]
    if not len(repeats):
        return
    position = int(repeats.min())
    duplicate = ids[position]
    for shard in shards:
        if position < shard.num_rows:
            raise DatasetError(
                f"shard {shard.file}, column {ID_COLUMN!r}, row {position}: duplicate "
                f"sample id {duplicate} in split {split!r}"
            )
        position -= shard.num_rows
