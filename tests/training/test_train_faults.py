"""Faults in real training runs (local Ray, SQLite MLflow, tiny data): a diverging run stops at
the step where the loss went non-finite and ends FAILED without checkpoints or a registered
model; a storage error before the loop ends the MLflow run FAILED; a corrupt latest checkpoint
makes ``--resume`` fall back to the newest intact one, and with none intact the run stops with
an error naming the bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from mvtcae.storage.checkpoints import CorruptCheckpointError
from mvtcae.training import train
from mvtcae.training.nonfinite import NonFiniteError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("own_ray")]

DIVERGING_LR = "train.optimizer.lr=1e30"  # Adam moves every weight by ~1e30 in one step


def _client(cfg):
    from mvtcae.tracking import client_for

    return client_for(cfg.tracking)


def _only_run(cfg):
    client = _client(cfg)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return run


def _no_models(cfg) -> bool:
    return not _client(cfg).search_registered_models(
        f"name = '{cfg.tracking.registered_model_name}'"
    )


def test_a_diverging_run_stops_at_the_bad_step_and_fails(tmp_path, tiny_dataset, make_config):
    cfg = make_config(tmp_path, tiny_dataset, DIVERGING_LR, "train.grad_clip_norm=null")
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 2: .*loss=") as caught:
        train(cfg)
    run = _only_run(cfg)
    assert run.info.status == "FAILED"
    assert "NonFiniteError" in run.data.tags["mvtcae.error"]
    assert "epoch 1, step 2" in run.data.tags["mvtcae.nonfinite"]
    assert "val/loss" not in run.data.metrics  # no epoch was reported
    run_dirs = [p for p in (tmp_path / "ray_results").iterdir() if p.name.startswith(cfg.name)]
    assert run_dirs and not list(run_dirs[0].glob("checkpoint_epoch_*"))
    assert _no_models(cfg)
    assert caught.value.epoch == 1


def test_skipping_bad_steps_has_a_budget(tmp_path, tiny_dataset, make_config):
    cfg = make_config(
        tmp_path,
        tiny_dataset,
        DIVERGING_LR,
        "train.grad_clip_norm=null",
        "train.on_nonfinite=skip",
        "train.max_nonfinite_steps=3",
    )
    with pytest.raises(NonFiniteError, match="4 steps skipped, over train.max_nonfinite_steps=3"):
        train(cfg)
    assert _only_run(cfg).info.status == "FAILED"
    assert _no_models(cfg)


def test_a_storage_error_before_the_loop_fails_the_mlflow_run(tmp_path, tiny_dataset, make_config):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where run storage should be")
    cfg = make_config(tmp_path, tiny_dataset, f"train.storage_path={blocker / 'ray_results'}")
    with pytest.raises(OSError):
        train(cfg)
    run = _only_run(cfg)
    assert run.info.status == "FAILED"
    assert "Error" in run.data.tags["mvtcae.error"]


def test_a_resume_with_no_intact_checkpoint_fails_naming_them(tmp_path, tiny_dataset, make_config):
    """Every checkpoint truncated: a clear error naming the bad ones, and a FAILED run. (A
    corrupt newest checkpoint with an intact one before it is drilled on demo.yaml in
    test_shipped_faults.py: the resume falls back to the older one.)"""
    extra = ("name=corrupt-test", "train.checkpoint.metric=epoch", "train.checkpoint.mode=max")
    # The first run only leaves checkpoints behind: no evaluation, no model logged.
    quick = ("eval.latent_accuracy=false", "eval.joint_nll=false", "tracking.log_model=false")
    cfg = make_config(
        tmp_path, tiny_dataset, *extra, *quick, "eval.coherence=false", "eval.plots=false"
    )
    first = train(cfg)
    run_dir = Path(first.run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0002",
        "checkpoint_epoch_0003",
    ]
    for path in run_dir.glob("checkpoint_epoch_*/model.safetensors"):
        path.write_bytes(b"")
    again = make_config(tmp_path, tiny_dataset, *extra, "train.epochs=6")
    with pytest.raises(CorruptCheckpointError, match="no intact checkpoint to restore") as err:
        train(again, resume=True)
    assert "checkpoint_epoch_0002" in str(err.value) and "checkpoint_epoch_0003" in str(err.value)
    assert _client(cfg).get_run(first.run_id).info.status == "FAILED"
