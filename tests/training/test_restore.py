"""A checkpoint restores into a fresh model and optimizer exactly, whatever the modality names.

The shipped configs train on mfeat, whose modalities (fou, fac, kar, pix, zer, mor) are neither
sorted nor of one shape. A model reloaded with its modalities in another order got each
parameter's Adam moments from another parameter; torch restores optimizer state by position
without checking shapes, and its fused kernel then wrote out of bounds (SIGSEGV on every
resume of the demo config). These tests use that shape of data, without Ray.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig
from mvtcae.config import TrainSection
from mvtcae.storage.checkpoints import (
    CorruptCheckpointError,
    TrainerState,
    capture_rng_state,
    load_model,
    read_rng_states,
    restore_optimizer,
    restore_rng_state,
    save_checkpoint,
)
from mvtcae.training import build_optimizer, build_scheduler, train_step

# mfeat's views, in the dataset's order (not sorted) and with their widths.
MFEAT_VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
DEVICE = torch.device("cpu")


def _mfeat_shaped_model(seed: int = 0) -> MVTCAE:
    torch.manual_seed(seed)
    config = MVTCAEConfig(
        n_modalities=len(MFEAT_VIEWS),
        latent_dim=8,
        input_dims={m: (w,) for m, w in MFEAT_VIEWS.items()},
        decoders_dist=dict.fromkeys(MFEAT_VIEWS, "normal"),
        alpha=5 / 6,
        beta=2.5,
    )
    return MVTCAE(config)


def _batches(n: int, rows: int = 32) -> list[MultimodalBatch]:
    generator = torch.Generator().manual_seed(1)
    return [
        MultimodalBatch(
            data={m: torch.randn(rows, w, generator=generator) for m, w in MFEAT_VIEWS.items()}
        )
        for _ in range(n)
    ]


def _steps(
    model: MVTCAE,
    optimizer: torch.optim.Optimizer,
    batches: list[MultimodalBatch],
    cfg: TrainSection,
) -> list[float]:
    model.train()
    losses = []
    for batch in batches:
        sums, applied = train_step(
            model, batch, optimizer, DEVICE, cfg.precision, cfg.grad_clip_norm
        )
        assert applied
        losses.append(float(sums["loss"]))
    return losses


def test_a_reloaded_model_lists_its_parameters_in_the_saved_order(tmp_path: Path) -> None:
    model = _mfeat_shaped_model()
    model.save(tmp_path / "m")
    reloaded = MVTCAE.load(tmp_path / "m")
    assert list(reloaded.model_config.input_dims) == list(MFEAT_VIEWS)
    saved = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    assert [(n, tuple(p.shape)) for n, p in reloaded.named_parameters()] == saved


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_restored_run_continues_exactly_as_the_uninterrupted_one(
    tmp_path: Path, fused: bool, precision: str
) -> None:
    cfg = TrainSection(
        precision=precision,
        optimizer={"name": "adam", "fused": fused},
        schedule={"name": "cosine", "warmup_epochs": 1},
        epochs=4,
    )
    first, second = _batches(3), _batches(6)[3:]

    model = _mfeat_shaped_model()
    optimizer = build_optimizer(model.named_parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    _steps(model, optimizer, first, cfg)
    scheduler.step()
    save_checkpoint(
        tmp_path / "ckpt", model, optimizer, scheduler, TrainerState(epoch=1), [capture_rng_state()]
    )
    straight = _steps(model, optimizer, second, cfg)

    restored = load_model(tmp_path / "ckpt")
    optimizer2 = build_optimizer(restored.named_parameters(), cfg)
    scheduler2 = build_scheduler(optimizer2, cfg)
    assert restore_optimizer(tmp_path / "ckpt", optimizer2, scheduler2).epoch == 1
    # Checked before any step: with the moments of another parameter, a fused step crashes.
    saved = torch.load(tmp_path / "ckpt" / "optimizer.pt", weights_only=True)
    saved_by_name = dict(
        zip(
            saved["param_groups"][0]["param_names"], saved["param_groups"][0]["params"], strict=True
        )
    )
    for name, param in restored.named_parameters():
        state = optimizer2.state[param]
        torch.testing.assert_close(state["exp_avg"], saved["state"][saved_by_name[name]]["exp_avg"])
        assert state["exp_avg"].shape == param.shape, name
    restore_rng_state(read_rng_states(tmp_path / "ckpt")[0])
    assert _steps(restored, optimizer2, second, cfg) == pytest.approx(straight, rel=1e-6)


def test_a_checkpoint_of_another_model_is_refused_naming_the_parameter(tmp_path: Path) -> None:
    """Optimizer state saved by position (no names) for a model whose parameters come in another
    order: a clear error, never a crash inside the optimizer."""
    cfg = TrainSection()
    model = _mfeat_shaped_model()
    optimizer = build_optimizer(model.parameters(), cfg)  # no names: restored by position
    _steps(model, optimizer, _batches(1), cfg)
    save_checkpoint(
        tmp_path / "ckpt", model, optimizer, build_scheduler(optimizer, cfg), TrainerState(epoch=1)
    )

    views = dict(sorted(MFEAT_VIEWS.items()))  # the same modalities, another order
    other = MVTCAE(
        MVTCAEConfig(
            n_modalities=len(views), latent_dim=8, input_dims={m: (w,) for m, w in views.items()}
        )
    )
    optimizer2 = build_optimizer(other.parameters(), cfg)
    with pytest.raises(CorruptCheckpointError, match=r"optimizer state 'exp_avg' of parameter #0"):
        restore_optimizer(tmp_path / "ckpt", optimizer2, build_scheduler(optimizer2, cfg))


def test_a_checkpoint_with_other_parameter_names_is_refused(tmp_path: Path) -> None:
    cfg = TrainSection()
    model = _mfeat_shaped_model()
    optimizer = build_optimizer(model.named_parameters(), cfg)
    _steps(model, optimizer, _batches(1), cfg)
    save_checkpoint(
        tmp_path / "ckpt", model, optimizer, build_scheduler(optimizer, cfg), TrainerState(epoch=1)
    )
    renamed = {("x" + m if m == "fou" else m): w for m, w in MFEAT_VIEWS.items()}
    other = MVTCAE(
        MVTCAEConfig(
            n_modalities=len(renamed),
            latent_dim=8,
            input_dims={m: (w,) for m, w in renamed.items()},
        )
    )
    optimizer2 = build_optimizer(other.named_parameters(), cfg)
    with pytest.raises(CorruptCheckpointError, match=r"no optimizer state for parameters.*xfou"):
        restore_optimizer(tmp_path / "ckpt", optimizer2, build_scheduler(optimizer2, cfg))
