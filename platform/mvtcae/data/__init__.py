"""Multimodal Parquet shards: format, writers, validation and Ray Data input.

Heavy imports (Ray, torch) load only when ``open_splits``/``iter_model_batches``/
``to_model_batch`` are first used, so writing and validating stay light.
"""

from __future__ import annotations

from typing import Any

from mvtcae.data.arrays import SplitArrays, write_arrays, write_dataset_from_arrays
from mvtcae.data.files import MANIFEST_FILE, DatasetError, DatasetFiles
from mvtcae.data.format import (
    FORMAT_VERSION,
    Manifest,
    ModalitySpec,
    ShardSpec,
    SplitSpec,
    load_manifest,
    presence_column,
)
from mvtcae.data.missing import random_presence
from mvtcae.data.npz import read_npz_splits, write_dataset_from_npz
from mvtcae.data.reader import load_split_arrays
from mvtcae.data.validate import ensure_valid, validate_dataset
from mvtcae.data.writer import DatasetWriter

_LAZY = {
    "open_splits": "mvtcae.data.ray_input",
    "iter_model_batches": "mvtcae.data.ray_input",
    "to_model_batch": "mvtcae.data.ray_input",
    "prepare_polymnist": "mvtcae.data.polymnist",
    "prepare_mfeat": "mvtcae.data.mfeat",
}

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "DatasetError",
    "DatasetFiles",
    "DatasetWriter",
    "Manifest",
    "ModalitySpec",
    "ShardSpec",
    "SplitArrays",
    "SplitSpec",
    "ensure_valid",
    "iter_model_batches",
    "load_manifest",
    "load_split_arrays",
    "open_splits",
    "prepare_mfeat",
    "prepare_polymnist",
    "presence_column",
    "random_presence",
    "read_npz_splits",
    "to_model_batch",
    "validate_dataset",
    "write_arrays",
    "write_dataset_from_arrays",
    "write_dataset_from_npz",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mvtcae.data' has no attribute {name!r}")
