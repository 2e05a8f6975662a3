"""Reading a whole split into NumPy with plain pyarrow (no Ray): evaluation and tests."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mvtcae.data.files import DatasetFiles, dataset_files
from mvtcae.data.format import ID_COLUMN, LABEL_COLUMN, load_manifest, presence_column
from mvtcae.data.validate import tensor_column_numpy


def load_split_arrays(
    path: str | os.PathLike | DatasetFiles, split: str, *, modalities: list[str] | None = None
) -> dict:
    """Read split ``split`` of the dataset at ``path`` (a directory or a URI) in shard order.

    Returns ``{"data": {m: (n, *shape) stored dtype}, "masks": {m: bool (n,)},
    "labels": int64 (n,) or None, "ids": int64 (n,)}``. Values are as stored (uint8 images
    stay uint8; ``to_model_batch`` applies the manifest's transform).
    """
    files = dataset_files(path)
    manifest = load_manifest(files)
    names = modalities or manifest.modality_names
    unknown = set(names) - set(manifest.modalities)
    if unknown:
        raise KeyError(f"{files}: no modalities {sorted(unknown)}; has {manifest.modality_names}")
    columns = [ID_COLUMN, *([LABEL_COLUMN] if manifest.has_labels else [])]
    columns += [c for m in names for c in (m, presence_column(m))]
    tables = [
        pq.read_table(p, columns=columns, filesystem=files.fs)
        for p in manifest.shard_paths(files, split)
    ]
    table = pa.concat_tables(tables) if tables else manifest.arrow_schema().empty_table()
    return {
        "data": {m: tensor_column_numpy(table.column(m), manifest.modalities[m]) for m in names},
        "masks": {m: table.column(presence_column(m)).to_numpy().astype(bool) for m in names},
        "labels": (
            table.column(LABEL_COLUMN).to_numpy().astype(np.int64) if manifest.has_labels else None
        ),
        "ids": table.column(ID_COLUMN).to_numpy().astype(np.int64),
    }
