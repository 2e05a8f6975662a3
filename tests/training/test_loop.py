"""The training building blocks without Ray: steps, schedules, clipping, precision, checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mvtcae import MVTCAE, MultimodalBatch
from mvtcae.config import ModelSection, ScheduleSection, TrainSection
from mvtcae.data import load_manifest, load_split_arrays
from mvtcae.storage.checkpoints import TrainerState, load_model, restore_optimizer, save_checkpoint
from mvtcae.training import (
    build_optimizer,
    build_scheduler,
    lr_factor,
    model_config_for,
    run_train_epoch,
    run_validation,
)


def _batches(dataset: Path, batch_size: int = 64) -> list[MultimodalBatch]:
    arrays = load_split_arrays(dataset, "train")
    n = len(arrays["labels"])
    data = {m: torch.from_numpy(x).float() for m, x in arrays["data"].items()}
    return [
        MultimodalBatch(data={m: x[i : i + batch_size] for m, x in data.items()})
        for i in range(0, n, batch_size)
    ]


def _model(dataset: Path, seed: int = 0) -> MVTCAE:
    torch.manual_seed(seed)
    section = ModelSection(latent_dim=8, decoder_scale=0.75)
    return MVTCAE(model_config_for(section, load_manifest(dataset)))


def test_model_config_comes_from_the_manifest(tiny_dataset: Path) -> None:
    manifest = load_manifest(tiny_dataset)
    section = ModelSection(latent_dim=8, decoders_dist={"v1": "laplace"}, decoder_scale={"v1": 0.5})
    cfg = model_config_for(section, manifest)
    assert cfg.n_modalities == 3
    assert cfg.input_dims == {m: (12,) for m in ("v0", "v1", "v2")}
    assert cfg.decoders_dist["v1"] == "laplace"
    assert cfg.decoders_dist["v0"] == manifest.modalities["v0"].distribution
    assert cfg.decoder_dist_params["v1"] == {"scale": 0.5}
    with pytest.raises(ValueError, match=r"decoders_dist names modalities \['m9'\]"):
        model_config_for(ModelSection(decoders_dist={"m9": "normal"}), manifest)


def test_a_run_takes_the_platforms_model_defaults_not_multivaes(tiny_dataset: Path) -> None:
    from mvtcae import MVTCAEConfig

    # The experiment's model section: the platform's defaults, passed on field by field ...
    cfg = model_config_for(ModelSection(), load_manifest(tiny_dataset))
    assert (cfg.latent_dim, cfg.alpha, cfg.beta) == (32, 5 / 6, 2.5)
    # ... while the model library keeps multivae's public API defaults.
    library = MVTCAEConfig(n_modalities=3)
    assert (library.latent_dim, library.alpha, library.beta) == (10, 0.1, 2.5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_lowers_the_loss(tiny_dataset: Path, precision: str) -> None:
    batches = _batches(tiny_dataset)
    model = _model(tiny_dataset)
    cfg = TrainSection(precision=precision, grad_clip_norm=100.0, optimizer={"lr": 3e-3})
    optimizer = build_optimizer(model.parameters(), cfg)
    before = run_validation(model, batches)
    sums = {}
    for _ in range(4):
        sums = run_train_epoch(model, batches, optimizer, torch.device("cpu"), cfg)
    after = run_validation(model, batches)
    assert sums["rows"] == 600 and sums["steps"] == len(batches)
    assert torch.isfinite(torch.tensor(list(sums.values()))).all()
    assert after["loss"] / after["rows"] < 0.8 * before["loss"] / before["rows"]
    assert set(after) >= {"joint_divergence", "recon_v0", "kld_v0", "rows"}
    assert next(model.parameters()).dtype == torch.float32  # autocast keeps fp32 weights


def test_gradient_clipping_bounds_the_update(tiny_dataset: Path) -> None:
    batch = _batches(tiny_dataset)[:1]
    model = _model(tiny_dataset)
    cfg = TrainSection(grad_clip_norm=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    sums = run_train_epoch(model, batch, optimizer, torch.device("cpu"), cfg)
    assert sums["grad_norm_sum"] > 1e-3  # the pre-clipping norm is reported
    step = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    )
    assert step <= 1e-3 * 1.01


def test_schedules() -> None:
    cosine = ScheduleSection(name="cosine", warmup_epochs=2, min_lr_ratio=0.1)
    assert lr_factor(0, cosine, 12) == pytest.approx(0.1)
    assert lr_factor(2, cosine, 12) == pytest.approx(1.0)
    assert lr_factor(12, cosine, 12) == pytest.approx(0.1)
    step = ScheduleSection(name="step", step_epochs=3, gamma=0.5)
    assert [lr_factor(e, step, 10) for e in (0, 2, 3, 6)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(5, ScheduleSection(), 10) == 1.0


def test_checkpoint_round_trip(tiny_dataset: Path, tmp_path: Path) -> None:
    batches = _batches(tiny_dataset)
    model = _model(tiny_dataset)
    cfg = TrainSection(epochs=4, schedule={"name": "cosine"})
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    run_train_epoch(model, batches, optimizer, torch.device("cpu"), cfg)
    scheduler.step()
    state = TrainerState(epoch=1, metrics={"val/loss": 1.5}, precision="fp32", world_size=2)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, scheduler, state)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {
        "model_config.json",
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "checksums.json",
    }

    restored = load_model(tmp_path / "ckpt")
    optimizer2 = build_optimizer(restored.parameters(), cfg)
    scheduler2 = build_scheduler(optimizer2, cfg)
    state2 = restore_optimizer(tmp_path / "ckpt", optimizer2, scheduler2)
    assert state2 == state
    for a, b in zip(model.state_dict().values(), restored.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    exp_avg = next(iter(optimizer.state.values()))["exp_avg"]
    torch.testing.assert_close(next(iter(optimizer2.state.values()))["exp_avg"], exp_avg)
    assert scheduler2.last_epoch == scheduler.last_epoch == 1
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"])
    # The restored run continues identically: same next step on the same batch.
    torch.manual_seed(1)
    a = run_train_epoch(model, batches[:1], optimizer, torch.device("cpu"), cfg)["loss"]
    torch.manual_seed(1)
    b = run_train_epoch(restored, batches[:1], optimizer2, torch.device("cpu"), cfg)["loss"]
    assert a == pytest.approx(b, rel=1e-5)


def test_missing_checkpoint_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="trainer_state.json missing"):
        from mvtcae.storage.checkpoints import read_trainer_state

        read_trainer_state(tmp_path)
