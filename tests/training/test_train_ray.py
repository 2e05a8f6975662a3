"""End-to-end training on a real local Ray and a real SQLite MLflow store (tiny data).

One Ray session serves the module. Covers: the loss goes down, checkpoints are kept by the
configured metric, the MLflow run holds params/metrics/artifacts and a registered version with
its alias, and ``resume`` continues the same run. A killed worker's recovery is tested on the
shipped demo config (tests/training/test_shipped_faults.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mvtcae.data import load_manifest
from mvtcae.training import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray")]

CHECKPOINT_FILES = {
    "model_config.json",
    "model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
}


def _client(cfg):
    from mvtcae.tracking import client_for

    return client_for(cfg.tracking)


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _runs(client, cfg) -> list:
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    return client.search_runs([experiment.experiment_id])


def test_train_tracks_registers_and_resumes(
    tmp_path: Path, tiny_dataset: Path, make_config
) -> None:
    cfg = make_config(tmp_path, tiny_dataset, "tracking.system_metrics_interval_s=1")
    result = train(cfg)

    # The loss goes down and every epoch reported its terms, throughput and time.
    client = _client(cfg)
    val_loss = _history(client, result.run_id, "val/loss")
    assert [s for s, _ in val_loss] == [1, 2, 3]
    assert val_loss[-1][1] < val_loss[0][1]
    assert (
        _history(client, result.run_id, "train/loss")[-1][1]
        < _history(client, result.run_id, "train/loss")[0][1]
    )
    metrics = client.get_run(result.run_id).data.metrics
    for key in (
        "train/recon_v0",
        "train/kld_v2",
        "train/joint_divergence",
        "val/recon_v1",
        "perf/samples_per_s",
        "perf/epoch_time_s",
        "lr",
    ):
        assert key in metrics, key
    assert metrics["perf/samples_per_s"] > 0

    # Checkpoints: the best two by val/loss, each a complete directory.
    run_dir = Path(result.run_dir)
    checkpoints = sorted(run_dir.glob("checkpoint_epoch_*"))
    assert [p.name for p in checkpoints] == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]
    for path in checkpoints:
        assert {p.name for p in path.iterdir()} >= CHECKPOINT_FILES
    assert result.best_checkpoint == str(run_dir / "checkpoint_epoch_0003")
    assert (run_dir / "evaluation" / "evaluation.json").is_file()

    # MLflow: params (flattened config), artifacts, evaluation metrics, registered + champion.
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3"
    assert run.data.params["model.latent_dim"] == "8"
    # A small materialised dataset is read once and held by the workers (data.hold_in_workers).
    assert run.data.tags["mvtcae.data.input"] == "held"
    assert run.data.tags["mvtcae.train.host"] == "ray train worker group"
    # This test's Ray is not one the driver started: the evaluation ran in a Ray task.
    assert run.data.tags["mvtcae.eval.host"] == "ray task"
    # Two workers on one node: the node's first worker samples the machine, once.
    assert "system/rank0/cpu_utilization_percentage" in run.data.metrics
    assert not [k for k in run.data.metrics if k.startswith("system/rank1/")]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "evaluation"} <= artifacts
    assert "evaluation/evaluation.json" in {
        a.path for a in client.list_artifacts(result.run_id, "evaluation")
    }
    assert "eval/joint_nll" in run.data.metrics and "eval/latent_acc_1" in run.data.metrics
    assert result.registered.version == 1 and result.registered.alias == "champion"
    champion = client.get_model_version_by_alias("tiny-mvtcae", "champion")
    assert champion.run_id == result.run_id
    # Lineage: the dataset is the run's input, and the version names it, its run and config.
    digest = load_manifest(tiny_dataset).digest()
    (used,) = run.inputs.dataset_inputs
    assert (used.dataset.digest, used.dataset.name) == (digest, load_manifest(tiny_dataset).name)
    assert champion.tags["mvtcae.dataset.digest"] == digest
    assert champion.tags["mvtcae.config"] == f"runs:/{result.run_id}/config.yaml"
    plots = client.list_artifacts(result.run_id, "evaluation/plots")
    assert any(a.path.endswith(".png") for a in plots)

    # Resume with more epochs: the same Ray run and MLflow run continue from epoch 3. An
    # attempt that died after logging epoch 4 but before its checkpoint left a value there:
    # epoch 4 is trained again and not logged twice.
    client.log_metric(result.run_id, "val/loss", 123.0, step=4)
    longer = make_config(tmp_path, tiny_dataset, "train.epochs=4")
    resumed = train(longer, resume=True)
    assert (resumed.run_id, resumed.run_dir) == (result.run_id, result.run_dir)
    assert [s for s, _ in _history(client, result.run_id, "val/loss")] == [1, 2, 3, 4]
    assert [s for s, _ in _history(client, result.run_id, "train/loss")] == [1, 2, 3]
    assert _history(client, result.run_id, "train/resumed_after_epoch") == [(3, 3.0)]
    assert len(_runs(client, cfg)) == 1
    assert resumed.registered.version == 2


def test_resume_without_a_run_says_so(tmp_path: Path, tiny_dataset: Path, make_config) -> None:
    cfg = make_config(tmp_path, tiny_dataset, "name=never-ran")
    with pytest.raises(FileNotFoundError, match="no run named never-ran-"):
        train(cfg, resume=True)


def test_image_grids_at_every_epoch_and_system_metrics_are_logged(
    tmp_path: Path, make_config
) -> None:
    from mlflow import MlflowClient

    from mvtcae.data import write_arrays

    rng = np.random.default_rng(0)

    def split(n: int) -> dict:
        labels = rng.integers(0, 2, n)
        image = rng.random((n, 1, 8, 8)) * 0.3 + 0.6 * labels[:, None, None, None]
        vector = rng.normal(size=(n, 4)) + labels[:, None]
        data = {"img": image.astype(np.float32), "vec": vector.astype(np.float32)}
        return {"data": data, "labels": labels}

    write_arrays(tmp_path / "images", {"train": split(128), "test": split(48)}, name="tiny-img")
    cfg = make_config(
        tmp_path,
        tmp_path / "images",
        "train.epochs=2",
        "train.num_workers=1",
        "eval.images_every_n_epochs=1",
        "eval.grid_samples=3",
        "tracking.system_metrics_interval_s=1",
    )
    result = train(cfg)
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    logged = [a.path for a in client.list_artifacts(result.run_id, "images")]
    # MLflow names each logged image <key>+step+<step>+timestamp+...; '/' in a key becomes '~'.
    for grid in ("reconstruction", "cross_modal_img"):
        steps = {
            int(p.split("+step+")[1].split("+")[0])
            for p in logged
            if f"images~{grid}+step+" in p and p.endswith(".png")
        }
        assert steps == {1, 2}, (grid, logged)
    # ... and the worker's machine, as MLflow system metrics under its rank.
    metrics = client.get_run(result.run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/rank0/{name}" in metrics, sorted(metrics)
