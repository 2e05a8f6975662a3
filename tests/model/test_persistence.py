"""save -> load gives the same model, with no pickle anywhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig


class TwoHeadEncoder(nn.Module):
    """A custom encoder rebuilt on load from its importable reference and init_kwargs."""

    def __init__(self, n_in: int, d: int):
        super().__init__()
        self.init_kwargs = {"n_in": n_in, "d": d}
        self.lin = nn.Linear(n_in, 2 * d)

    def forward(self, x):
        return tuple(self.lin(x).chunk(2, dim=-1))


@pytest.mark.parametrize("family", ["mlp", "conv"])
def test_save_load_same_outputs(tmp_path, family):
    torch.manual_seed(0)
    cfg = MVTCAEConfig(
        n_modalities=2, latent_dim=5, input_dims={"img": (1, 12, 12), "v": (4,)},
        decoders_dist={"img": "bernoulli"}, default_networks=family, alpha=0.7,
    )  # fmt: skip
    model = MVTCAE(cfg)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "model.safetensors",
        "model_config.json",
    ]
    back = MVTCAE.load(tmp_path / "m")
    batch = MultimodalBatch(data={"img": torch.rand(3, 1, 12, 12).round(), "v": torch.randn(3, 4)})
    torch.manual_seed(1)
    a = model(batch)
    torch.manual_seed(1)
    b = back(batch)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, rtol=0, atol=0)
    torch.testing.assert_close(
        model.encode(batch, return_mean=True).z, back.encode(batch, return_mean=True).z
    )
    assert back.model_config == model.model_config


def test_custom_networks_rebuilt_from_reference(tmp_path):
    cfg = MVTCAEConfig(n_modalities=2, latent_dim=3, input_dims={"a": (4,), "b": (6,)})
    model = MVTCAE(cfg, encoders={"a": TwoHeadEncoder(4, 3), "b": TwoHeadEncoder(6, 3)})
    model.save(tmp_path / "m")
    back = MVTCAE.load(tmp_path / "m")
    assert isinstance(back.encoders["a"], TwoHeadEncoder)
    batch = MultimodalBatch(data={"a": torch.randn(2, 4), "b": torch.randn(2, 6)})
    torch.testing.assert_close(
        model.encode(batch, return_mean=True).z, back.encode(batch, return_mean=True).z
    )


def test_load_missing_files_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_config.json"):
        MVTCAE.load(tmp_path)


def test_weights_file_holds_no_pickle(tmp_path):
    torch.manual_seed(0)
    MVTCAE(MVTCAEConfig(n_modalities=1, latent_dim=2, input_dims={"a": (3,)})).save(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    assert b"\x80\x04" not in raw[:64] and raw[8:9] == b"{"  # safetensors: u64 length + JSON header
