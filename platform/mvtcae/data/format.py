"""The shard format: column names, Arrow schema and the ``manifest.json`` beside the shards.

A dataset is a directory::

    DATASET/
      manifest.json            # this module's Manifest, written last
      train/part-00000.parquet # one Parquet file per shard, listed in the manifest
      test/part-00000.parquet

Each shard holds one fixed-shape tensor column per modality (pyarrow's canonical
``arrow.fixed_shape_tensor`` extension type), a boolean ``<modality>__present`` column, an
optional int64 ``label`` and an int64 ``sample_id``. See docs/data-format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mvtcae.data.files import MANIFEST_FILE, DatasetError, DatasetFiles, dataset_files
from mvtcae.safety.names import UnsafeNameError, check_name, check_relative_path, path_inside

FORMAT_NAME = "mvtcae-shards"
FORMAT_VERSION = 1
LABEL_COLUMN = "label"
ID_COLUMN = "sample_id"
PRESENT_SUFFIX = "__present"
SHARD_SUFFIX = ".parquet"

Distribution = Literal["normal", "laplace", "bernoulli", "categorical"]
Transform = Literal["none", "divide_255"]
STORED_DTYPES = ("uint8", "float16", "float32")


def checked_name(value: str, what: str, where: str | os.PathLike) -> str:
    """``check_name`` for dataset code: an unsafe name raises DatasetError prefixed by ``where``."""
    try:
        return check_name(value, what)
    except UnsafeNameError as err:
        raise DatasetError(f"{where}: {err}") from err


def dataset_file(root: str | os.PathLike, relative: str, what: str) -> Path:
    """``root / relative`` resolved; DatasetError if it is not inside the dataset ``root``."""
    try:
        return path_inside(root, relative, what)
    except UnsafeNameError as err:
        raise DatasetError(f"{Path(root) / MANIFEST_FILE}: {err}") from err


def presence_column(modality: str) -> str:
    """Name of the boolean column that says where ``modality`` is observed."""
    return f"{modality}{PRESENT_SUFFIX}"


class ModalitySpec(BaseModel):
    """One modality: its per-sample shape, stored dtype and how the input path reads it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    shape: tuple[int, ...]
    dtype: str
    distribution: Distribution = "normal"
    transform: Transform = "none"
    kind: Literal["image", "vector", "tensor"] = "tensor"
    description: str = ""

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in STORED_DTYPES:
            raise ValueError(f"stored dtype {value!r} is not one of {STORED_DTYPES}")
        return value

    @field_validator("shape")
    @classmethod
    def _positive_shape(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(int(d) <= 0 for d in value):
            raise ValueError(f"shape {value} must be non-empty with positive sizes")
        return value

    @property
    def scale(self) -> float:
        """Factor that turns stored values into model inputs (1/255 for uint8 images)."""
        return 1.0 / 255.0 if self.transform == "divide_255" else 1.0

    @property
    def numel(self) -> int:
        """Number of values in one sample of this modality."""
        return int(np.prod(self.shape))

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one stored sample."""
        return self.numel * np.dtype(self.dtype).itemsize

    def arrow_type(self) -> pa.DataType:
        """The column's Arrow type: a canonical fixed-shape tensor of the stored dtype."""
        return pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(self.dtype)), list(self.shape))


class ShardSpec(BaseModel):
    """One Parquet file: its path relative to the dataset directory, rows, size and SHA-256."""

    model_config = ConfigDict(extra="forbid")

    file: str
    num_rows: int
    num_bytes: int
    sha256: str

    @field_validator("file")
    @classmethod
    def _relative_file(cls, value: str) -> str:
        return check_relative_path(value, "shard file", suffix=SHARD_SUFFIX)


class SplitSpec(BaseModel):
    """One split (train/val/test): row count, per-modality present counts and its shards."""

    model_config = ConfigDict(extra="forbid")

    num_rows: int
    present_rows: dict[str, int] = Field(default_factory=dict)
    shards: list[ShardSpec]

    @property
    def num_bytes(self) -> int:
        """Bytes on disk of the split's shards."""
        return sum(s.num_bytes for s in self.shards)


class Manifest(BaseModel):
    """What ``manifest.json`` records about a dataset directory."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["mvtcae-shards"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    name: str
    description: str = ""
    modalities: dict[str, ModalitySpec]
    num_classes: int | None = None
    has_labels: bool = False
    splits: dict[str, SplitSpec]
    preprocessing: dict = Field(default_factory=dict)
    source: dict = Field(default_factory=dict)
    created_at: str = ""

    @field_validator("format_version")
    @classmethod
    def _supported_version(cls, value: int) -> int:
        if value != FORMAT_VERSION:
            raise ValueError(f"format_version {value} is not supported (this code reads 1)")
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        # The classifier cache puts the dataset name into a directory name.
        return check_name(value, "dataset name")

    @field_validator("modalities")
    @classmethod
    def _valid_names(cls, value: dict[str, ModalitySpec]) -> dict[str, ModalitySpec]:
        if not value:
            raise ValueError("a dataset needs at least one modality")
        reserved = {LABEL_COLUMN, ID_COLUMN}
        for name in value:
            if name in reserved or name.endswith(PRESENT_SUFFIX) or not name.isidentifier():
                raise ValueError(
                    f"modality name {name!r} is not allowed: use an identifier that is not "
                    f"{sorted(reserved)} and does not end with {PRESENT_SUFFIX!r}"
                )
            # Identifiers may be non-ASCII or start with '_'; cache file names may not.
            check_name(name, "modality name")
        return value

    @field_validator("splits")
    @classmethod
    def _safe_split_names(cls, value: dict[str, SplitSpec]) -> dict[str, SplitSpec]:
        for split in value:
            check_name(split, "split name")
        return value

    @property
    def modality_names(self) -> list[str]:
        """Modality names in manifest order."""
        return list(self.modalities)

    @property
    def row_bytes(self) -> int:
        """Uncompressed bytes of one row (tensors, presence flags, label and id)."""
        extra = len(self.modalities) + 8 + (8 if self.has_labels else 0)
        return sum(spec.row_bytes for spec in self.modalities.values()) + extra

    def digest(self) -> str:
        """What identifies the dataset's content: 32 hex digits of a SHA-256 over the schema, the
        preprocessing and every shard's file, row count and checksum (not the name, description
        or creation time). Equal digests mean the same rows in the same shards."""
        content = {
            "format": [self.format, self.format_version],
            "modalities": {
                m: spec.model_dump(mode="json", exclude={"description"})
                for m, spec in self.modalities.items()
            },
            "num_classes": self.num_classes,
            "has_labels": self.has_labels,
            "preprocessing": self.preprocessing,
            "splits": {
                name: [[s.file, s.num_rows, s.sha256] for s in split.shards]
                for name, split in sorted(self.splits.items())
            },
        }
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema every shard of this dataset has."""
        fields = [pa.field(ID_COLUMN, pa.int64(), nullable=False)]
        if self.has_labels:
            fields.append(pa.field(LABEL_COLUMN, pa.int64(), nullable=False))
        for name, spec in self.modalities.items():
            fields.append(pa.field(name, spec.arrow_type(), nullable=False))
            fields.append(pa.field(presence_column(name), pa.bool_(), nullable=False))
        return pa.schema(fields)

    def shard_paths(self, root: str | os.PathLike | DatasetFiles, split: str) -> list[str]:
        """Paths of a split's shards on the file system of the dataset at ``root`` (absolute
        paths for a local directory, ``bucket/prefix/...`` for an object store)."""
        if split not in self.splits:
            raise DatasetError(f"dataset has no split {split!r}; it has {sorted(self.splits)}")
        files = dataset_files(root)
        return [
            files.path(shard.file, f"split {split!r} shard file")
            for shard in self.splits[split].shards
        ]


def load_manifest(path: str | os.PathLike | DatasetFiles) -> Manifest:
    """Read and check ``manifest.json`` of the dataset at ``path`` (a directory or a URI)."""
    files = dataset_files(path)
    file = files.show(MANIFEST_FILE)
    try:
        text = files.read_text(MANIFEST_FILE)
    except FileNotFoundError:
        raise DatasetError(f"{file}: no manifest; is {files} a dataset directory?") from None
    except OSError as err:
        raise DatasetError(f"{file}: cannot be read ({err})") from err
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{file}: not valid JSON ({err})") from err
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        raise DatasetError(f"{file}: does not describe a dataset: {describe_errors(err)}") from err


_MAPPING_FIELDS = frozenset({"splits", "modalities", "present_rows"})


def describe_errors(err: ValidationError) -> str:
    """Pydantic's errors as ``field: message`` lines, without echoing whole input values.

    Locations read like Python: ``splits['train'].shards[0].file``.
    """
    lines = []
    for error in err.errors():
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{_location(error['loc'])}: {message}")
    return "; ".join(lines)


def _location(loc: tuple) -> str:
    text, parent = "", None
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif parent in _MAPPING_FIELDS:
            text += f"[{part!r}]"
        else:
            text += f".{part}" if text else str(part)
        parent = part
    return text or "manifest"


def save_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write ``manifest.json`` into ``directory`` and return its path."""
    file = Path(directory) / MANIFEST_FILE
    file.write_text(manifest.model_dump_json(indent=2) + "\n")
    return file
