"""Training with its dataset and run storage on an object store: a real moto S3 server, a real
local Ray.

The dataset and the storage path are ``s3://`` URIs, as in the KubeRay RayJobs. Ray Data streams
the shards from the bucket, evaluation reads its split from there; run state, checkpoints and
the evaluation land in the bucket; ``--resume`` finds the run there (and trusts the dataset's
validation record instead of re-hashing it); the model is registered from it, and its lineage
leads back to the dataset in the bucket.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
import ray

from conftest import write_tiny_dataset
from mvtcae import storage
from mvtcae.data import load_manifest
from mvtcae.data.validate import RECORD_MARGIN_NS
from mvtcae.tracking import client_for
from mvtcae.tracking.dataset_lineage import trace
from mvtcae.training import RUN_STATE_FILE, train
from testkit import create_bucket, s3_environment, s3_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def s3_and_ray(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server with bucket ``ckpts``; Ray starts inside the AWS environment, so its
    workers reach the same endpoint (on a cluster the runtime environment carries it)."""
    with s3_server(tmp_path_factory.mktemp("moto")) as endpoint, s3_environment(endpoint):
        create_bucket(endpoint, "ckpts")
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint
        finally:
            ray.shutdown()


def _val_loss_steps(cfg, run_id: str) -> list[int]:
    return sorted(m.step for m in client_for(cfg.tracking).get_metric_history(run_id, "val/loss"))


def test_a_run_checkpoints_evaluates_registers_and_resumes_on_s3(
    tmp_path: Path, make_config, monkeypatch, caplog
) -> None:
    monkeypatch.chdir(tmp_path)  # anything written to a local "s3:" directory would show here
    root, dataset = "s3://ckpts/ray", "s3://ckpts/datasets/tiny"
    write_tiny_dataset(dataset)
    time.sleep(RECORD_MARGIN_NS / 1e9)  # old enough for the first run's check to be recorded
    cfg = make_config(
        tmp_path,
        dataset,
        f"train.storage_path={root}",
        "train.epochs=2",
        "tracking.experiment_name=s3-runs",
        "tracking.registered_model_name=s3-mvtcae",
    )
    assert (cfg.train.storage_path, cfg.data.dir) == (root, dataset)
    result = train(cfg)

    assert result.run_dir == storage.join(root, result.run_name)
    assert storage.list_dirs(root) == [result.run_name, "mvtcae_runs"]  # the run and its index
    assert storage.is_file(storage.join(root, "mvtcae_runs", cfg.name, f"{result.run_name}.json"))
    state = json.loads(storage.read_text(storage.join(result.run_dir, RUN_STATE_FILE)))
    assert state["mlflow_run_id"] == result.run_id
    checkpoints = [d for d in storage.list_dirs(result.run_dir) if d.startswith("checkpoint_")]
    assert checkpoints == ["checkpoint_epoch_0001", "checkpoint_epoch_0002"]
    assert result.best_checkpoint in {storage.join(result.run_dir, c) for c in checkpoints}
    for name in ("model.safetensors", "model_config.json", "optimizer.pt", "trainer_state.json"):
        assert storage.is_file(storage.join(result.best_checkpoint, name)), name
    evaluation = storage.join(result.run_dir, "evaluation")
    report = json.loads(storage.read_text(storage.join(evaluation, "evaluation.json")))
    assert report["metrics"]["eval/joint_nll"] == pytest.approx(
        result.eval_metrics["eval/joint_nll"]
    )
    with storage.local_directory(storage.join(evaluation, "plots")) as plots_dir:
        assert sorted(p.suffix for p in plots_dir.iterdir()) == [".png"] * len(report["plots"])
    assert not (tmp_path / "s3:").exists()

    client = client_for(cfg.tracking)
    plots = client.list_artifacts(result.run_id, "evaluation/plots")
    assert plots and all(a.path.endswith(".png") for a in plots)
    assert result.registered.version == 1 and result.registered.alias == "champion"
    # Where the job's time went: the driver's phases, on the result and on the run.
    assert set(result.phases) == {
        "dataset",
        "ray_start",
        "run_setup",
        "validation",
        "dataset_open",
        "trainer_fit",
        "evaluation",
        "mlflow_evaluation",
        "registration",
    }
    assert 0 < sum(result.phases.values()) <= result.wall_time_s
    logged = client.get_run(result.run_id).data.metrics
    assert logged["time/trainer_fit_s"] == pytest.approx(result.phases["trainer_fit"])
    assert logged["time/driver_total_s"] == pytest.approx(result.wall_time_s)
    reports = client.get_metric_history(result.run_id, "perf/report_s")  # checkpoint + report
    assert sorted(m.step for m in reports) == [1, 2]
    # Ray Train's controller polls at train.controller_poll_s (Ray's own default is 2 s).
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == str(cfg.train.controller_poll_s)
    assert "eval/coherence_2" in result.eval_metrics  # labels and classifiers from S3
    lineage = trace("models:/s3-mvtcae@champion", client)
    assert (lineage.dataset_source, lineage.dataset_matches) == (dataset, True)
    assert lineage.dataset_digest == load_manifest(dataset).digest()

    longer = make_config(
        tmp_path,
        dataset,
        f"train.storage_path={root}",
        "train.epochs=3",
        "tracking.experiment_name=s3-runs",
        "tracking.registered_model_name=s3-mvtcae",
        "eval.coherence=false",
    )
    with caplog.at_level(logging.INFO, logger="mvtcae.data.validate"):
        resumed = train(longer, resume=True)
    assert f"dataset {dataset} (digest {lineage.dataset_digest}) was fully validated" in caplog.text
    assert (resumed.run_id, resumed.run_dir) == (result.run_id, result.run_dir)
    assert _val_loss_steps(cfg, result.run_id) == [1, 2, 3]
    kept = [d for d in storage.list_dirs(result.run_dir) if d.startswith("checkpoint_")]
    assert "checkpoint_epoch_0003" in kept and len(kept) == 2
