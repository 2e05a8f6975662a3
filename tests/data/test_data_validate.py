"""Each class of bad data fails validation with the shard file, column and first bad row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from mvtcae.cli import main
from mvtcae.data import DatasetError, validate_dataset
from mvtcae.data.files import sha256_file

SHARD = "train/part-00001.parquet"


def rewrite_shard(root: Path, shard: str, table: pa.Table) -> None:
    """Replace a shard and re-sign it in the manifest, so only the content is wrong."""
    pq.write_table(table, root / shard)
    manifest = json.loads((root / "manifest.json").read_text())
    for spec in manifest["splits"]["train"]["shards"]:
        if spec["file"] == shard:
            spec["sha256"] = sha256_file(root / shard)
            spec["num_bytes"] = (root / shard).stat().st_size
    (root / "manifest.json").write_text(json.dumps(manifest))


def edit_column(root: Path, column: str, edit) -> None:
    """Apply ``edit(values) -> values`` to one column of SHARD, keeping its Arrow type."""
    table = pq.read_table(root / SHARD)
    field = table.schema.field(column)
    values = table.column(column).combine_chunks()
    if isinstance(field.type, pa.FixedShapeTensorType):
        new = pa.FixedShapeTensorArray.from_numpy_ndarray(edit(values.to_numpy_ndarray().copy()))
    else:
        new = pa.array(edit(values.to_numpy(zero_copy_only=False).copy()), type=field.type)
    rewrite_shard(
        root,
        SHARD,
        table.set_column(table.schema.get_field_index(column), field.with_type(new.type), new),
    )


def expect_error(root: Path, *parts: str) -> str:
    with pytest.raises(DatasetError) as info:
        validate_dataset(root)
    message = str(info.value)
    for part in parts:
        assert part in message, message
    return message


def test_clean_dataset_validates(dataset: Path) -> None:
    manifest = validate_dataset(dataset)
    assert set(manifest.splits) == {"train", "test"}


def test_checksum_mismatch(dataset: Path) -> None:
    with open(dataset / SHARD, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    expect_error(dataset, f"shard {SHARD}", "checksum mismatch")


def test_missing_shard(dataset: Path) -> None:
    (dataset / SHARD).unlink()
    expect_error(dataset, f"shard {SHARD}", "missing from")


def test_extra_shard(dataset: Path) -> None:
    (dataset / "train" / "part-00099.parquet").write_bytes((dataset / SHARD).read_bytes())
    expect_error(dataset, "shard train/part-00099.parquet", "not listed")


def test_missing_manifest(dataset: Path) -> None:
    (dataset / "manifest.json").unlink()
    expect_error(dataset, "manifest.json", "no manifest")


def test_manifest_row_count_disagrees(dataset: Path) -> None:
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][1]["num_rows"] = 31
    manifest["splits"]["train"]["num_rows"] = 95
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    expect_error(dataset, f"shard {SHARD}", "32 rows where the manifest says 31")


def test_wrong_tensor_shape(dataset: Path) -> None:
    edit_column(dataset, "img", lambda x: np.ascontiguousarray(x[:, :, :, :4]))
    expect_error(dataset, f"shard {SHARD}", "column 'img'", "(3, 6, 4)", "(3, 6, 5)")


def test_wrong_dtype(dataset: Path) -> None:
    edit_column(dataset, "img", lambda x: x.astype(np.float32))
    expect_error(dataset, f"shard {SHARD}", "column 'img'", "float", "uint8")


def test_missing_column(dataset: Path) -> None:
    table = pq.read_table(dataset / SHARD).drop_columns(["vec__present"])
    rewrite_shard(dataset, SHARD, table)
    expect_error(dataset, f"shard {SHARD}", "column 'vec__present'", "missing")


def test_unexpected_column(dataset: Path) -> None:
    table = pq.read_table(dataset / SHARD)
    rewrite_shard(dataset, SHARD, table.append_column("extra", pa.array(np.zeros(32))))
    expect_error(dataset, f"shard {SHARD}", "column 'extra'", "not in the manifest")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(dataset: Path, bad: float) -> None:
    def poison(x: np.ndarray) -> np.ndarray:
        x[7, 3] = bad
        x[20, 0] = bad
        return x

    edit_column(dataset, "vec", poison)
    expect_error(dataset, f"shard {SHARD}", "column 'vec'", "row 7:", "NaN or Inf")


def test_row_with_no_modality_present(dataset: Path) -> None:
    def drop(values: np.ndarray, column: str) -> np.ndarray:
        values[11] = False
        return values

    edit_column(dataset, "img__present", lambda v: drop(v, "img"))
    # Zero row 11 of img too, so that only the all-missing row is wrong.
    edit_column(dataset, "img", lambda x: (x.__setitem__(11, 0), x)[1])
    edit_column(dataset, "vec__present", lambda v: drop(v, "vec"))
    edit_column(dataset, "vec", lambda x: (x.__setitem__(11, 0), x)[1])
    expect_error(dataset, f"shard {SHARD}", "img__present, vec__present", "row 11:", "no modality")


def test_absent_value_not_zero_filled(dataset: Path) -> None:
    present = pq.read_table(dataset / SHARD).column("img__present").to_numpy()
    row = int(np.flatnonzero(~present)[0])
    edit_column(dataset, "img", lambda x: (x.__setitem__(row, 9), x)[1])
    expect_error(dataset, f"shard {SHARD}", "column 'img'", f"row {row}:", "not zero-filled")


def test_label_out_of_range(dataset: Path) -> None:
    edit_column(dataset, "label", lambda y: (y.__setitem__(5, 4), y)[1])
    expect_error(dataset, f"shard {SHARD}", "column 'label'", "row 5:", "outside [0, 4)")


def test_duplicate_sample_id(dataset: Path) -> None:
    edit_column(dataset, "sample_id", lambda ids: (ids.__setitem__(3, 0), ids)[1])
    expect_error(dataset, f"shard {SHARD}", "column 'sample_id'", "row 3:", "duplicate")


def test_cli_validate_exits_non_zero_naming_file_column_row(dataset: Path) -> None:
    ok = CliRunner().invoke(main, ["data", "validate", str(dataset)])
    assert ok.exit_code == 0, ok.output
    assert re.search(r"train: 96 rows, 3 shards", ok.output)
    edit_column(dataset, "vec", lambda x: (x.__setitem__(4, np.nan), x)[1])
    bad = CliRunner().invoke(main, ["data", "validate", str(dataset)])
    assert bad.exit_code == 1
    assert f"shard {SHARD}, column 'vec', row 4: NaN or Inf" in bad.output
