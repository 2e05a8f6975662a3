"""Lineage on a real SQLite MLflow store and real Parquet shards: the dataset a run used is its
MLflow input, a registered version names its dataset, run and config, and `mvtcae lineage`
follows the chain and says whether the dataset at its source still matches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
from click.testing import CliRunner

from mvtcae.cli import main
from mvtcae.data import load_manifest
from mvtcae.tracking import client_for, log_config, log_model_and_register, start_run
from mvtcae.tracking.dataset_lineage import log_dataset, trace
from testkit import write_tiny_views


def _dataset(directory: Path) -> Path:
    return write_tiny_views(directory, n_train=40, n_test=20, classes=3, width=4, name="tiny3")


def _registered(tracking, make_model, dataset: Path) -> str:
    with start_run(tracking, run_name="lineage") as run:
        log_config({"name": "lineage-exp", "model": {"alpha": 0.5}}, tracking=tracking)
        log_dataset(client_for(tracking), run.info.run_id, load_manifest(dataset), dataset)
        mlflow.log_metric("eval/joint_nll", 3.0)
        log_model_and_register(make_model(0), tracking, {"eval/joint_nll": 3.0})
        return run.info.run_id


def test_the_digest_follows_content_not_place_or_description(tmp_path: Path):
    first = load_manifest(_dataset(tmp_path / "a"))
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy)
    edited = json.loads((copy / "manifest.json").read_text())
    edited["description"], edited["created_at"] = "another text", "2001-01-01T00:00:00Z"
    (copy / "manifest.json").write_text(json.dumps(edited))
    assert load_manifest(copy).digest() == first.digest()
    edited["splits"]["train"]["shards"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(edited))
    assert load_manifest(copy).digest() != first.digest()
    assert len(first.digest()) == 32 and int(first.digest(), 16) >= 0


def test_a_version_traces_back_to_its_run_config_and_dataset(tracking, make_model, tmp_path):
    dataset = _dataset(tmp_path / "data")
    run_id = _registered(tracking, make_model, dataset)
    client = client_for(tracking)
    (used,) = client.get_run(run_id).inputs.dataset_inputs
    manifest = load_manifest(dataset)
    assert (used.dataset.name, used.dataset.digest) == ("tiny3", manifest.digest())
    assert json.loads(used.dataset.source)["uri"] == dataset.resolve().as_uri()
    assert json.loads(used.dataset.profile)["splits"] == {"train": 40, "test": 20}
    assert [t.value for t in used.tags if t.key == "mlflow.data.context"] == ["training"]

    found = trace("models:/tiny-mvtcae@champion", client)
    assert (found.version, found.run_id) == ("1", run_id)
    assert found.config["name"] == "lineage-exp"
    assert found.dataset_digest == manifest.digest() and found.dataset_matches is True
    assert trace("models:/tiny-mvtcae/1", client).run_id == run_id


def test_the_command_prints_the_chain_and_fails_when_the_dataset_changed(
    tracking, make_model, tmp_path
):
    dataset = _dataset(tmp_path / "data")
    run_id = _registered(tracking, make_model, dataset)
    args = [
        "lineage",
        "models:/tiny-mvtcae@champion",
        "--set",
        f"tracking.tracking_uri={tracking.tracking_uri}",
    ]
    ok = CliRunner().invoke(main, args)
    assert ok.exit_code == 0, ok.output
    digest = load_manifest(dataset).digest()
    for expected in (run_id, "runs:/" + run_id + "/config.yaml", f"digest {digest}", "matches"):
        assert expected in ok.output

    shard = next((dataset / "train").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-20] + b"\0" * 20)  # same size, other bytes
    changed = CliRunner().invoke(main, args)
    assert changed.exit_code == 1 and "DIFFERS" in changed.output and "checksum" in changed.output
    # Without re-hashing the shards the manifest still matches: the option says what it skips.
    quick = CliRunner().invoke(main, [*args, "--no-verify-files"])
    assert quick.exit_code == 0 and "matches" in quick.output

    bad = CliRunner().invoke(main, ["lineage", "runs:/abc/model", *args[2:]])
    assert bad.exit_code == 2 and "models:/NAME@ALIAS" in bad.output
