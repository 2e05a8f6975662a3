"""Training in the caller's process (`InProcessHost`, `train_in_process`), as single-worker sweep
trials do: checkpoints in run storage with the run's retention, and a run fitted again resumes
from its newest checkpoint exactly where an uninterrupted run would be."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mvtcae import storage
from mvtcae.data import load_manifest
from mvtcae.storage.checkpoints import (
    TrainerState,
    checkpoint_dir_name,
    read_trainer_state,
    save_checkpoint,
    verify_checkpoint,
)
from mvtcae.training import model_config_for, plan_loop, train_in_process
from mvtcae.training.hosts import InProcessHost, persist_checkpoint, run_checkpoints
from mvtcae.training.plan import ImageGrids, LoopPlan


def _written_checkpoint(directory: Path, epoch: int) -> Path:
    """A real checkpoint of a small model, as the loop writes it."""
    from mvtcae import MVTCAE, MVTCAEConfig

    torch.manual_seed(epoch)
    model = MVTCAE(MVTCAEConfig(n_modalities=2, latent_dim=2, input_dims={"a": (3,), "b": (3,)}))
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    directory.mkdir(parents=True)
    state = TrainerState(epoch=epoch, metrics={"epoch": epoch}, precision="fp32", world_size=1)
    save_checkpoint(directory, model, optimizer, scheduler, state, [{}])
    return directory


def test_checkpoints_persist_with_the_runs_retention(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    for epoch in (1, 2, 3, 4):
        local = _written_checkpoint(tmp_path / f"local{epoch}", epoch)
        saved = persist_checkpoint(local, run_dir, checkpoint_dir_name(epoch), keep=2)
        assert Path(saved.path) == tmp_path / "run" / checkpoint_dir_name(epoch)
        verify_checkpoint(saved.path)  # complete and intact where Ray Train would have put it
    assert run_checkpoints(run_dir) == ["checkpoint_epoch_0003", "checkpoint_epoch_0004"]
    # An epoch trained again after a corrupt checkpoint sorts after its older namesake.
    local = _written_checkpoint(tmp_path / "again", 4)
    persist_checkpoint(local, run_dir, checkpoint_dir_name(4, "a1b2c3"), keep=None)
    assert run_checkpoints(run_dir)[-1] == "checkpoint_epoch_0004-a1b2c3"
    host = InProcessHost(run_dir=run_dir, keep=2)
    assert Path(host.restore_point().path).name == "checkpoint_epoch_0004-a1b2c3"
    assert InProcessHost(run_dir=str(tmp_path / "none"), keep=2).restore_point() is None


def test_a_report_keeps_the_last_metrics_and_checkpoint(tmp_path: Path) -> None:
    host = InProcessHost(run_dir=str(tmp_path / "run"), keep=1)
    local = _written_checkpoint(tmp_path / "local", 5)
    host.report(
        {"epoch": 5, "val/loss": 1.5}, checkpoint_dir=str(local), dir_name="checkpoint_epoch_0005"
    )
    host.report({"stopped": 1.0})  # a stop record carries no checkpoint: the last one stays
    assert host.last_metrics == {"stopped": 1.0}
    assert read_trainer_state(host.last_checkpoint.path).epoch == 5
    with pytest.raises(ValueError, match="directory name"):
        host.report({"epoch": 6}, checkpoint_dir=str(local))


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray for the object store that holds the splits."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _fit(cfg, name: str, dataset: Path):
    plan = plan_loop(cfg, name, str(dataset), load_manifest(dataset), None, None)
    return train_in_process(plan.loop, plan.datasets)


@pytest.mark.parametrize("hold", ["true", "false"])
def test_a_run_fitted_again_resumes_where_an_uninterrupted_one_would_be(
    local_ray, tmp_path: Path, tiny_dataset: Path, make_config, hold: str
) -> None:
    common = (
        "train.num_workers=1",
        "train.checkpoint.num_to_keep=1",
        "train.seed=3",
        f"data.hold_in_workers={hold}",
        "data.materialize=true",
    )
    straight = make_config(tmp_path / "a", tiny_dataset, *common, "train.epochs=3")
    whole = _fit(straight, "straight", tiny_dataset)
    assert whole.metrics["epoch"] == 3 and math.isfinite(whole.metrics["val/loss"])

    threads = torch.get_num_threads()
    first = make_config(tmp_path / "b", tiny_dataset, *common, "train.epochs=2")
    part = _fit(first, "resumed", tiny_dataset)
    assert part.metrics["epoch"] == 2
    assert torch.get_num_threads() == threads  # the caller's setting is given back
    run_dir = storage.join(str(tmp_path / "b" / "ray_results"), "resumed")
    assert run_checkpoints(run_dir) == ["checkpoint_epoch_0002"]  # num_to_keep=1

    again = make_config(tmp_path / "b", tiny_dataset, *common, "train.epochs=3")
    rest = _fit(again, "resumed", tiny_dataset)
    assert rest.metrics["epoch"] == 3
    assert Path(rest.checkpoint.path).name == "checkpoint_epoch_0003"
    assert run_checkpoints(run_dir) == ["checkpoint_epoch_0003"]
    # The same model, optimizer, generators and row order as the run that never stopped.
    for key in ("train/loss", "val/loss"):
        assert rest.metrics[key] == pytest.approx(whole.metrics[key], rel=1e-6), key

    # Fitted again with no epoch left (a trial cut before its final evaluation): nothing is
    # trained, and the fit ends with the last checkpoint, for the evaluation to use.
    done = _fit(again, "resumed", tiny_dataset)
    assert done.checkpoint is not None
    assert Path(done.checkpoint.path).name == "checkpoint_epoch_0003"
    assert run_checkpoints(run_dir) == ["checkpoint_epoch_0003"]
    # ... and with that epoch's result (what a Tune trial reports again: its scheduler refuses
    # a trial whose last result lacks the sweep's objectives).
    assert done.metrics["epoch"] == 3
    assert done.metrics["val/loss"] == pytest.approx(rest.metrics["val/loss"], rel=1e-9)


def test_only_a_single_worker_trains_in_process(tmp_path: Path, tiny_dataset: Path, make_config):
    cfg = make_config(tmp_path, tiny_dataset)  # two workers
    plan = LoopPlan(
        train=cfg.train,
        model=model_config_for(cfg.model, load_manifest(tiny_dataset)),
        dataset_dir=str(tiny_dataset),
        run_dir=str(tmp_path),
        threads_per_worker=1,
        shuffle_buffer=0,
        images=ImageGrids(every=0, samples=1, split="test"),
    )
    with pytest.raises(ValueError, match="train.num_workers 1, not 2"):
        train_in_process(plan)
