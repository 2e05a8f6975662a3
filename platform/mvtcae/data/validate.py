"""Checking a dataset (a directory or an object-store prefix) against its manifest, shard by
shard, column by column; and the record that spares an unchanged dataset a second full check.

Every ``DatasetError`` names the shard file, the column and the first bad row, so a user
can find and fix the offending sample.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from mvtcae.config.locations import cache_root
from mvtcae.data.files import MANIFEST_FILE, DatasetError, DatasetFiles, dataset_files
from mvtcae.data.format import (
    ID_COLUMN,
    LABEL_COLUMN,
    SHARD_SUFFIX,
    Manifest,
    ModalitySpec,
    ShardSpec,
    load_manifest,
    presence_column,
)

ProgressFn = Callable[[str], None]
logger = logging.getLogger(__name__)

RECORD_VERSION = 1
RECORD_MARGIN_NS = 2_000_000_000
"""Shards modified less than this before a check are not recorded as checked (see
``validate_and_record``)."""


def validate_dataset(
    path: str | os.PathLike | DatasetFiles,
    *,
    check_values: bool = True,
    progress: ProgressFn | None = None,
) -> Manifest:
    """Check the dataset at ``path`` (a directory or a URI) and return its manifest; raise
    ``DatasetError``.

    Checks the manifest, missing or extra shards, checksums (streamed through the location's
    file system), row counts, the Arrow schema (columns, tensor shapes, dtypes) and, with
    ``check_values``, NaN/Inf, rows with no modality present, absent values that are not
    zero-filled, labels outside ``[0, num_classes)`` and duplicate sample ids.
    """
    files = dataset_files(path)
    manifest = load_manifest(files)
    _check_shard_files(files, manifest)
    expected = manifest.arrow_schema()
    for split, spec in manifest.splits.items():
        rows = sum(s.num_rows for s in spec.shards)
        if rows != spec.num_rows:
            raise DatasetError(
                f"{files.show(MANIFEST_FILE)}: split {split!r} lists {rows} shard rows but "
                f"num_rows {spec.num_rows}"
            )
        seen_ids: list[np.ndarray] = []
        for shard in spec.shards:
            if progress:
                progress(shard.file)
            _check_shard(files, manifest, shard, expected, check_values, seen_ids)
        if check_values:
            _check_unique_ids(split, spec.shards, seen_ids)
    return manifest


def ensure_valid(path: str | os.PathLike | DatasetFiles, *, full: bool = False) -> Manifest:
    """Validate the dataset at ``path`` unless it was fully validated before and is unchanged;
    return its manifest.

    The record of a full check is keyed by the manifest's digest and the location, and holds
    every shard's size and modification time: a record whose digest and stamps still match
    means the same bytes were checked, so the shards are not re-hashed. ``full=True`` checks
    everything again (and renews the record). Records live under ``record_dir()``.
    """
    files = dataset_files(path)
    manifest = load_manifest(files)
    record = record_file(files, manifest.digest())
    if not full and _record_holds(record, files):
        logger.info(
            "dataset %s (digest %s) was fully validated before and its shards are unchanged; "
            "not re-checked (data.revalidate: true forces a full check)",
            files,
            manifest.digest(),
        )
        return manifest
    return validate_and_record(files)


def validate_and_record(
    path: str | os.PathLike | DatasetFiles,
    *,
    check_values: bool = True,
    progress: ProgressFn | None = None,
) -> Manifest:
    """``validate_dataset``; a full check (``check_values``) that passes is recorded for
    ``ensure_valid``, unless a shard changed while it was being read."""
    files = dataset_files(path)
    started_ns = time.time_ns()
    before = _stamps(files) if check_values else None
    manifest = validate_dataset(files, check_values=check_values, progress=progress)
    if before is None or _stamps(files) != before:  # not a full check, or changed meanwhile
        return manifest
    # A shard rewritten within the store's time resolution of its first write could keep its
    # size and time (S3 keeps whole seconds): only shards older than that margin are vouched for.
    if any(mtime > started_ns - RECORD_MARGIN_NS for _, mtime in before.values()):
        logger.info("%s: shards written in the last seconds; validation not recorded", files)
        return manifest
    _write_record(record_file(files, manifest.digest()), files, manifest, before)
    return manifest


def record_dir() -> Path:
    """Where validation records are kept: ``$MVTCAE_CACHE_DIR/validated``, else
    ``~/.cache/mvtcae/validated``."""
    return cache_root() / "validated"


def record_file(files: DatasetFiles, digest: str) -> Path:
    """The record of the dataset with manifest digest ``digest`` at ``files``' location."""
    where = hashlib.sha256(files.location.encode()).hexdigest()[:12]
    return record_dir() / f"{digest}-{where}.json"


def _stamps(files: DatasetFiles) -> dict[str, list[int]]:
    return {
        name: [stamp.size, stamp.mtime_ns]
        for name, stamp in sorted(files.list_files(SHARD_SUFFIX).items())
    }


def _record_holds(record: Path, files: DatasetFiles) -> bool:
    try:
        saved = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    if saved.get("version") != RECORD_VERSION or saved.get("location") != files.location:
        return False
    try:
        return saved.get("stamps") == _stamps(files)
    except OSError:
        return False


def _write_record(
    record: Path, files: DatasetFiles, manifest: Manifest, stamps: dict[str, list[int]]
) -> None:
    content = {
        "version": RECORD_VERSION,
        "digest": manifest.digest(),
        "location": files.location,
        "validated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "stamps": stamps,
    }
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=record.parent, prefix=f".{record.name}.", delete=False
        ) as tmp:
            json.dump(content, tmp, indent=1)
        os.replace(tmp.name, record)
    except OSError as err:  # a cache, not a result: the next run validates again
        logger.warning("could not write the validation record %s (%s)", record, err)


def _check_shard_files(files: DatasetFiles, manifest: Manifest) -> None:
    listed = {Path(s.file).as_posix() for sp in manifest.splits.values() for s in sp.shards}
    for name in sorted(listed):
        # Resolved and contained: a listed name that is a symlink out of the dataset fails.
        if not files.is_file(name):
            raise DatasetError(
                f"shard {name}: listed in {MANIFEST_FILE} but missing from {files.show()}"
            )
    extra = sorted(set(files.list_files(SHARD_SUFFIX)) - listed)
    if extra:
        raise DatasetError(
            f"shard {extra[0]}: present in {files.show()} but not listed in {MANIFEST_FILE} "
            f"({len(extra)} extra shard(s)); remove it or rewrite the dataset"
        )


def _check_shard(
    files: DatasetFiles,
    manifest: Manifest,
    shard: ShardSpec,
    expected: pa.Schema,
    check_values: bool,
    seen_ids: list[np.ndarray],
) -> None:
    try:
        digest = files.sha256(shard.file)
    except OSError as err:
        raise DatasetError(f"shard {shard.file}: cannot be read ({err})") from err
    if digest != shard.sha256:
        raise DatasetError(
            f"shard {shard.file}: checksum mismatch (sha256 {digest[:12]}… where the manifest "
            f"says {shard.sha256[:12]}…): the file changed after it was written"
        )
    try:
        parquet = files.parquet(shard.file)
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


def _check_unique_ids(split: str, shards: list[ShardSpec], seen: list[np.ndarray]) -> None:
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
