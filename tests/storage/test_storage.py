"""Run-storage locations: local paths, ``file://`` URIs and S3 (a real moto S3 server over HTTP).

Every file operation runs against all three back ends, so the code that writes run state and
reads checkpoints behaves the same on a laptop and on an object store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mvtcae import storage
from testkit import create_bucket, s3_environment, s3_server


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server with the bucket ``runs``, this process's AWS environment pointed at it."""
    with s3_server(tmp_path_factory.mktemp("moto")) as endpoint, s3_environment(endpoint):
        create_bucket(endpoint, "runs")
        yield endpoint


_counter = iter(range(10**6))


@pytest.fixture(params=["local", "file-uri", "s3"])
def root(request, tmp_path: Path) -> str:
    """An empty storage location on each back end."""
    if request.param == "local":
        return storage.normalize(tmp_path / "store")
    if request.param == "file-uri":
        return storage.normalize(f"file://{tmp_path}/store")
    request.getfixturevalue("s3")
    return storage.normalize(f"s3://runs/test-{next(_counter)}")


# ---------------------------------------------------------------------------------------------
# Location strings
# ---------------------------------------------------------------------------------------------
def test_normalize_makes_local_paths_absolute_and_keeps_uris(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs/a") == str(tmp_path / "runs" / "a")
    assert storage.normalize(Path("runs")) == str(tmp_path / "runs")
    assert storage.normalize("s3://bucket/ray/") == "s3://bucket/ray"
    assert storage.normalize("gs://bucket") == "gs://bucket"
    assert storage.normalize("file:///tmp/a/../b/") == "file:///tmp/b"
    query = "s3://bucket/ray?endpoint_override=minio:9000&scheme=http"
    assert storage.normalize(query) == query


@pytest.mark.parametrize(
    ("location", "words"),
    [
        ("ftp://host/dir", "unsupported storage scheme 'ftp'"),
        ("file://relative/dir", "file:// needs an absolute path"),
        ("s3://", "no bucket or host"),
        ("  ", "empty"),
    ],
)
def test_normalize_names_what_is_wrong(location: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        storage.normalize(location)


@pytest.mark.parametrize(
    "location",
    ["s3://bucket/x?secret_key=SeCrEt&access_key=AKIA", "s3://AKIA:SeCrEt@bucket/x"],
)
def test_credentials_in_a_location_are_refused_without_repeating_them(location: str) -> None:
    with pytest.raises(storage.CredentialsInLocationError) as err:
        storage.normalize(location)
    assert "SeCrEt" not in str(err.value) and "AKIA" not in str(err.value)
    assert "environment" in str(err.value)


def test_config_errors_do_not_echo_a_location_with_credentials() -> None:
    from mvtcae.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.storage_path") as err:
        load_config(None, ["train.storage_path=s3://bucket/x?secret_key=SeCrEt"])
    assert "SeCrEt" not in str(err.value)


def test_join_and_basename_keep_the_query_out_of_the_path() -> None:
    root = "s3://bucket/ray?endpoint_override=h:9000&scheme=http"
    run = storage.join(root, "run-1", "checkpoint_epoch_0002")
    assert run == "s3://bucket/ray/run-1/checkpoint_epoch_0002?endpoint_override=h:9000&scheme=http"
    assert storage.basename(run) == "checkpoint_epoch_0002"
    assert storage.join("/data/ray", "run-1") == "/data/ray/run-1"
    assert storage.basename("/data/ray/run-1") == "run-1"


def test_location_of_maps_a_file_system_path_back_to_the_root_form(s3: str) -> None:
    root = "s3://runs/ray?scheme=http"
    assert storage.location_of(root, "runs/ray/r1/ckpt") == "s3://runs/ray/r1/ckpt?scheme=http"
    assert storage.location_of(root, "runs/ray") == root
    with pytest.raises(ValueError, match="not under storage location"):
        storage.location_of(root, "runs/other/ckpt")
    assert storage.location_of("/data/ray", "/data/ray/r1/ckpt") == "/data/ray/r1/ckpt"


# ---------------------------------------------------------------------------------------------
# File operations, on every back end
# ---------------------------------------------------------------------------------------------
def test_text_files_round_trip_and_overwrite_whole(root: str) -> None:
    state = storage.join(root, "run-1", "state.json")
    assert not storage.is_file(state)
    storage.write_text(state, '{"a": 1}')
    storage.write_text(state, '{"a": 2, "ü": true}')
    assert storage.is_file(state)
    assert storage.read_text(state) == '{"a": 2, "ü": true}'
    assert storage.list_dirs(root) == ["run-1"]  # parent directories were created
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_text(storage.join(root, "run-1", "missing.json"))


def test_list_dirs_lists_only_directories_sorted(root: str) -> None:
    assert storage.list_dirs(root) == []  # not created yet
    for name in ("b-run", "a-run"):
        storage.write_text(storage.join(root, name, "x.txt"), name)
    storage.write_text(storage.join(root, "loose.txt"), "not a directory")
    assert storage.list_dirs(root) == ["a-run", "b-run"]


def test_directories_upload_and_download_byte_for_byte(root: str, tmp_path: Path) -> None:
    source = tmp_path / "src"
    (source / "plots").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(70_000), "plots/grid.png": os.urandom(1000)}
    for name, data in files.items():
        (source / name).write_bytes(data)
    target = storage.join(root, "ckpt")
    storage.upload_directory(source, target)
    with storage.local_directory(target) as local:
        got = {
            p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()
        }
        kept = local
    assert got == files
    assert kept.exists() == (not storage.is_uri(root))  # a download is removed afterwards


def test_a_partial_download_fetches_only_the_named_files(root: str, tmp_path: Path) -> None:
    source = tmp_path / "ckpt"
    source.mkdir()
    for name in ("model_config.json", "model.safetensors", "optimizer.pt"):
        (source / name).write_bytes(name.encode() * 100)
    location = storage.join(root, "ckpt")
    storage.upload_directory(source, location)
    wanted = ("model_config.json", "model.safetensors", "architecture.json")  # last one absent
    with storage.local_directory(location, files=wanted) as local:
        names = sorted(p.name for p in local.iterdir())
        assert (local / "model.safetensors").read_bytes() == b"model.safetensors" * 100
    if storage.is_uri(root):
        assert names == ["model.safetensors", "model_config.json"]  # no optimizer state
    else:
        assert "optimizer.pt" in names  # a local directory is used in place


def test_local_directory_of_a_missing_location_names_it(root: str) -> None:
    missing = storage.join(root, "nope")
    with pytest.raises(FileNotFoundError, match="nope"), storage.local_directory(missing):
        pass


def test_staged_directory_publishes_only_on_success(root: str) -> None:
    good, bad = storage.join(root, "good"), storage.join(root, "bad")
    with storage.staged_directory(good) as out:
        (out / "evaluation.json").write_text("{}")
    assert storage.read_text(storage.join(good, "evaluation.json")) == "{}"
    with pytest.raises(RuntimeError), storage.staged_directory(bad) as out:
        (out / "partial.json").write_text("{")
        raise RuntimeError("evaluation failed")
    if storage.is_uri(root):
        assert not storage.is_file(storage.join(bad, "partial.json"))


def test_a_model_loads_from_a_checkpoint_in_object_storage(s3: str, tmp_path: Path) -> None:
    """`mvtcae evaluate s3://…/checkpoint` reads the same weights a local directory holds."""
    from mvtcae import MVTCAE, MVTCAEConfig
    from mvtcae.tracking import load_model_from

    torch.manual_seed(0)
    model = MVTCAE(MVTCAEConfig(n_modalities=2, input_dims={"a": (5,), "b": (3,)}, latent_dim=2))
    model.save(str(tmp_path / "ckpt"))
    storage.upload_directory(tmp_path / "ckpt", "s3://runs/models/ckpt")
    loaded = load_model_from("s3://runs/models/ckpt/")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with pytest.raises(FileNotFoundError, match="s3://runs/models/none"):
        load_model_from("s3://runs/models/none")
