"""Datasets on an object store (a real moto S3 server on 127.0.0.1): written there atomically,
validated with checksums streamed from there, read and streamed by Ray Data in place; and the
validation record that spares an unchanged dataset a second full check."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from click.testing import CliRunner

from mvtcae.data import (
    DatasetError,
    DatasetFiles,
    DatasetWriter,
    ensure_valid,
    load_manifest,
    load_split_arrays,
    validate_dataset,
    write_arrays,
)
from mvtcae.data.validate import RECORD_MARGIN_NS, record_file
from testkit import create_bucket, s3_environment, s3_server

BUCKET = "datasets"


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server with bucket ``datasets``; the process's AWS settings point at it."""
    with s3_server(tmp_path_factory.mktemp("moto")) as endpoint, s3_environment(endpoint):
        create_bucket(endpoint, BUCKET)
        yield endpoint


def _bucket_files(prefix: str) -> set[str]:
    """Every object under ``s3://datasets/<prefix>`` and its siblings' hidden staging prefixes."""
    fs, root = pafs.FileSystem.from_uri(f"s3://{BUCKET}")
    found = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {i.path for i in found if i.type == pafs.FileType.File and prefix in i.path}


def _put(uri: str, data: bytes) -> None:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def _get(uri: str) -> bytes:
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def test_a_dataset_written_to_s3_reads_back_like_the_local_one(s3, arrays, tmp_path):
    uri = f"s3://{BUCKET}/same"
    remote = write_arrays(uri, arrays, name="tiny", num_classes=4, rows_per_shard=32)
    local = write_arrays(tmp_path / "ds", arrays, name="tiny", num_classes=4, rows_per_shard=32)

    # The content digest does not depend on where the dataset lives.
    assert remote.digest() == local.digest() == load_manifest(uri).digest()
    assert validate_dataset(uri).digest() == local.digest()
    for split in ("train", "test"):
        got, want = load_split_arrays(uri, split), load_split_arrays(tmp_path / "ds", split)
        np.testing.assert_array_equal(got["ids"], want["ids"])
        np.testing.assert_array_equal(got["labels"], want["labels"])
        for name in ("img", "vec"):
            np.testing.assert_array_equal(got["data"][name], want["data"][name])
            np.testing.assert_array_equal(got["masks"][name], want["masks"][name])
    assert _bucket_files("same/") == {
        f"{BUCKET}/same/{name}"
        for name in ["manifest.json", *(s.file for sp in remote.splits.values() for s in sp.shards)]
    }


def test_writes_to_s3_are_atomic_and_refuse_to_clobber(s3, arrays):
    uri = f"s3://{BUCKET}/atomic"
    writer = DatasetWriter(
        uri,
        name="tiny",
        modalities=_specs(arrays),
        num_classes=4,
        has_labels=True,
        rows_per_shard=16,
    )
    with pytest.raises(RuntimeError, match="stopped halfway"), writer:
        part = arrays["train"]
        writer.add("train", part.data, part.masks, part.labels)  # two shards staged
        raise RuntimeError("stopped halfway")
    assert _bucket_files("atomic") == set()  # nothing at the target, no staging left behind

    first = write_arrays(uri, arrays, name="tiny", num_classes=4, rows_per_shard=16)
    with pytest.raises(FileExistsError, match="s3://datasets/atomic exists"):
        write_arrays(uri, arrays, name="tiny", num_classes=4)

    # Replacing: fewer, larger shards; the old ones are gone (validation finds no extra shard).
    second = write_arrays(
        uri, arrays, name="tiny", num_classes=4, rows_per_shard=64, overwrite=True
    )
    assert len(second.splits["train"].shards) < len(first.splits["train"].shards)
    assert validate_dataset(uri).digest() == second.digest()
    assert all("tmp-" not in f for f in _bucket_files("atomic"))


def test_an_upload_that_fails_says_why_and_leaves_nothing_behind(s3, arrays):
    """A bucket that does not exist: the store's own error comes through (not one from the
    clean-up after it), and the local staging directory is gone."""
    import tempfile

    staging = set(Path(tempfile.gettempdir()).glob("mvtcae-dataset-*"))
    with pytest.raises(OSError, match="nobucket"):
        write_arrays("s3://nobucket/tiny", arrays, name="tiny", num_classes=4)
    assert set(Path(tempfile.gettempdir()).glob("mvtcae-dataset-*")) == staging


def test_validation_of_s3_names_the_shard_at_fault(s3, arrays):
    uri = f"s3://{BUCKET}/faults"
    manifest = write_arrays(uri, arrays, name="tiny", num_classes=4, rows_per_shard=32)
    shard = manifest.splits["train"].shards[1].file
    original = _get(f"{uri}/{shard}")

    _put(f"{uri}/{shard}", original[:-9] + b"corrupted")
    with pytest.raises(DatasetError, match=f"shard {shard}: checksum mismatch"):
        validate_dataset(uri)

    _put(f"{uri}/{shard}", original)
    _put(f"{uri}/train/part-00099.parquet", original)
    with pytest.raises(DatasetError, match="shard train/part-00099.parquet: present in s3://"):
        validate_dataset(uri)

    fs, path = pafs.FileSystem.from_uri(f"{uri}/train/part-00099.parquet")
    fs.delete_file(path)
    fs.delete_file(path.replace("part-00099", shard.split("/")[-1].removesuffix(".parquet")))
    with pytest.raises(DatasetError, match=f"shard {shard}: listed in manifest.json but missing"):
        validate_dataset(uri)


def test_the_validation_record_spares_a_second_check_until_a_shard_changes(s3, arrays, caplog):
    uri = f"s3://{BUCKET}/record"
    manifest = write_arrays(uri, arrays, name="tiny", num_classes=4, rows_per_shard=32)
    files = DatasetFiles(uri)
    record = record_file(files, manifest.digest())
    ensure_valid(uri)
    # S3 keeps whole seconds: shards this young could be rewritten unseen, so no record yet.
    assert not record.exists()

    time.sleep(RECORD_MARGIN_NS / 1e9)
    ensure_valid(uri)
    assert record.is_file() and Path(os.environ["MVTCAE_CACHE_DIR"]) in record.parents
    with caplog.at_level(logging.INFO, logger="mvtcae.data.validate"):
        ensure_valid(uri)
    assert "not re-checked" in caplog.text

    # A rewritten shard (same manifest, so the same digest) voids the record: checked again.
    shard = manifest.splits["test"].shards[0].file
    _put(f"{uri}/{shard}", _get(f"{uri}/{shard}")[:-9] + b"corrupted")
    with pytest.raises(DatasetError, match=f"shard {shard}: checksum mismatch"):
        ensure_valid(uri)


def test_a_full_recheck_finds_what_the_record_cannot_see(arrays, tmp_path):
    """Size and time are what the record trusts: a same-size change with its time put back
    passes the record, and ``full=True`` (data.revalidate) still finds it."""
    root = tmp_path / "ds"
    manifest = write_arrays(root, arrays, name="tiny", num_classes=4, rows_per_shard=32)
    time.sleep(RECORD_MARGIN_NS / 1e9)
    ensure_valid(root)
    shard = root / manifest.splits["train"].shards[0].file
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    data[-20] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    assert ensure_valid(root).digest() == manifest.digest()
    with pytest.raises(DatasetError, match="checksum mismatch"):
        ensure_valid(root, full=True)


def test_the_data_cli_prepares_and_validates_on_s3(s3, arrays, tmp_path):
    from mvtcae.cli import main

    npz = tmp_path / "arrays.npz"
    flat = {}
    for split, part in arrays.items():
        for name, values in part.data.items():
            flat[f"{split}/{name}"] = values
            flat[f"{split}/{name}__present"] = part.masks[name]
        flat[f"{split}/label"] = part.labels
    np.savez(npz, **flat)
    uri = f"s3://{BUCKET}/cli/tiny"
    runner = CliRunner()

    wrote = runner.invoke(main, ["data", "prepare", "arrays", str(npz), uri])
    assert wrote.exit_code == 0, wrote.output
    assert f"wrote {uri}: tiny" in wrote.output
    time.sleep(RECORD_MARGIN_NS / 1e9)
    valid = runner.invoke(main, ["data", "validate", uri])
    assert valid.exit_code == 0, valid.output
    assert f"valid {uri}: tiny" in valid.output
    assert record_file(DatasetFiles(uri), load_manifest(uri).digest()).is_file()

    again = runner.invoke(main, ["data", "prepare", "arrays", str(npz), uri])
    assert again.exit_code == 1 and f"{uri} exists; pass overwrite=True" in again.output

    shard = load_manifest(uri).splits["train"].shards[0].file
    _put(f"{uri}/{shard}", b"not parquet at all")
    broken = runner.invoke(main, ["data", "validate", uri])
    assert broken.exit_code == 1 and f"shard {shard}: checksum mismatch" in broken.output


def test_credentials_in_a_dataset_uri_are_refused_without_echoing_them(s3):
    with pytest.raises(DatasetError) as caught:
        DatasetFiles(f"s3://AKIAKEY:hunter2-secret@{BUCKET}/x")
    assert "hunter2-secret" not in str(caught.value)
    assert "credentials" in str(caught.value)


def _specs(arrays):
    from mvtcae.data.arrays import infer_modality_spec

    return {m: infer_modality_spec(m, a) for m, a in arrays["train"].data.items()}
