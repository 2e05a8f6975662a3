"""Missing modalities: zero (never NaN) gradients, exclusion from the loss, clear errors."""

from __future__ import annotations

import pytest
import torch

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    cfg = MVTCAEConfig(n_modalities=3, latent_dim=4, input_dims={"a": (6,), "b": (5,), "c": (2, 3)})
    return MVTCAE(cfg)


def _batch(n=6, requires_grad=False, placeholder=0.0):
    data = {"a": torch.randn(n, 6), "b": torch.randn(n, 5), "c": torch.randn(n, 2, 3)}
    masks = {m: torch.ones(n, dtype=torch.bool) for m in data}
    masks["b"][[1, 4]] = False
    masks["c"][[0, 1]] = False
    for m, x in data.items():
        x[~masks[m]] = placeholder
        x.requires_grad_(requires_grad)
    return MultimodalBatch(data=data, masks=masks)


@pytest.mark.parametrize("placeholder", [0.0, 1e4])
def test_missing_rows_get_exactly_zero_gradient(model, placeholder):
    batch = _batch(requires_grad=True, placeholder=placeholder)
    model(batch).loss.backward()
    for m, x in batch.data.items():
        assert torch.isfinite(x.grad).all(), m
        missing = ~batch.masks[m]
        assert (x.grad[missing] == 0).all(), m
        assert x.grad[~missing].abs().sum() > 0, m


def test_encoder_of_an_absent_modality_gets_zero_gradient(model):
    batch = _batch()
    batch.masks["c"][:] = False
    model(batch).loss.backward()
    for p in model.encoders["c"].parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert (p.grad == 0).all()
    assert any(p.grad.abs().sum() > 0 for p in model.encoders["a"].parameters())


def test_missing_modality_terms_are_zero_and_loss_divides_by_all_rows(model):
    batch = _batch()
    batch.masks["c"][:] = False
    torch.manual_seed(5)
    out = model(batch)
    assert out.metrics["c"] == 0 and out.metrics["kld_c"] == 0
    # dropping the absent modality from the batch altogether gives the same loss
    torch.manual_seed(5)
    without = model(
        MultimodalBatch(
            data={m: batch.data[m] for m in "ab"}, masks={m: batch.masks[m] for m in "ab"}
        )
    )
    torch.testing.assert_close(out.loss_sum, without.loss_sum)
    torch.testing.assert_close(out.loss, out.loss_sum / len(batch))


def test_all_true_masks_equal_no_masks(model):
    batch = _batch()
    full = MultimodalBatch(
        data=batch.data, masks={m: torch.ones(6, dtype=torch.bool) for m in "abc"}
    )
    torch.manual_seed(9)
    a = model(full)
    torch.manual_seed(9)
    b = model(MultimodalBatch(data=batch.data))
    torch.testing.assert_close(a.loss_sum, b.loss_sum)


def test_row_with_no_modality_is_a_clear_error(model):
    batch = _batch()
    for m in "abc":
        batch.masks[m][3] = False
    with pytest.raises(ValueError, match="1 of 6 rows have none of the modalities"):
        model(batch)


def test_encode_honours_masks_and_names_empty_rows(model):
    batch = _batch()
    z = model.encode(batch, cond_mod=["a", "b"], return_mean=True).z
    assert z.shape == (6, 4) and torch.isfinite(z).all()
    with pytest.raises(ValueError, match="2 of 6 rows have none of the modalities \\['c'\\]"):
        model.encode(batch, cond_mod="c")
