"""encode / decode / predict / generate shapes and input handling."""

from __future__ import annotations

import pytest
import torch

from mvtcae import MVTCAE, ModelOutput, MultimodalBatch, MVTCAEConfig
from mvtcae.model.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder

D = 6


@pytest.fixture(scope="module", params=["mlp", "conv"])
def model(request):
    torch.manual_seed(0)
    cfg = MVTCAEConfig(
        n_modalities=2,
        latent_dim=D,
        input_dims={"img": (3, 28, 28), "vec": (7,)},
        default_networks=request.param,
    )
    return MVTCAE(cfg)


@pytest.fixture
def batch():
    return MultimodalBatch(data={"img": torch.rand(4, 3, 28, 28), "vec": torch.randn(4, 7)})


def test_default_network_families(model):
    family = model.model_config.default_networks
    expected = (ConvEncoder, ConvDecoder) if family == "conv" else (MLPEncoder, MLPDecoder)
    assert isinstance(model.encoders["img"], expected[0])
    assert isinstance(model.decoders["img"], expected[1])
    assert isinstance(model.encoders["vec"], MLPEncoder)  # vectors always get MLPs


@pytest.mark.parametrize("cond", ["all", "img", ["vec"], ["img", "vec"]])
def test_encode_shapes(model, batch, cond):
    out = model.encode(batch, cond_mod=cond)
    assert out.one_latent_space is True
    assert out.z.shape == (4, D)
    assert model.encode(batch, cond_mod=cond, N=3).z.shape == (4, 3, D)
    assert model.encode(batch, cond_mod=cond, N=3, flatten=True).z.shape == (12, D)


def test_encode_return_mean_is_deterministic(model, batch):
    a = model.encode(batch, return_mean=True).z
    b = model.encode(batch, return_mean=True, N=2).z
    torch.testing.assert_close(b[:, 0], a)
    torch.testing.assert_close(b[:, 1], a)
    mu, _ = model.joint_posterior(batch)
    torch.testing.assert_close(a, mu)


def test_encode_n_samples_follow_the_multivae_draw(model, batch):
    mu, logvar = model.joint_posterior(batch)
    torch.manual_seed(4)
    z = model.encode(batch, N=5).z
    torch.manual_seed(4)
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).rsample([5])  # (N, n, d)
    torch.testing.assert_close(z, ref.transpose(0, 1))


def test_predict_and_decode_shapes(model, batch):
    out = model.predict(batch, cond_mod="vec", gen_mod="img")
    assert isinstance(out, ModelOutput) and list(out) == ["img"]
    assert out.img.shape == (4, 3, 28, 28)
    many = model.predict(batch, cond_mod=["img"], gen_mod="all", N=2)
    assert many["img"].shape == (4, 2, 3, 28, 28) and many["vec"].shape == (4, 2, 7)
    dec = model.decode(model.encode(batch), modalities="vec")
    assert dec["vec"].shape == (4, 7)


def test_generate_from_prior_keeps_batch_dim(model):
    assert model.generate_from_prior(1).z.shape == (1, D)
    assert model.generate_from_prior(5).z.shape == (5, D)
    assert model.decode(model.generate_from_prior(1))["img"].shape == (1, 3, 28, 28)


@pytest.mark.parametrize("bad", [3, [], "nope", ["img", 2], ("img", "zzz")])
def test_bad_cond_mod_is_a_clear_error(model, batch, bad):
    with pytest.raises(ValueError, match="cond_mod"):
        model.encode(batch, cond_mod=bad)


def test_multivae_style_inputs_are_accepted(model, batch):
    class DatasetOutput:  # what multivae's datasets hand to the model
        def __init__(self, data):
            self.data = data

    torch.manual_seed(1)
    a = model(DatasetOutput(batch.data)).loss
    torch.manual_seed(1)
    b = model({"data": batch.data}).loss
    torch.testing.assert_close(a, b)
    with pytest.raises(TypeError, match="not a batch"):
        model(42)


class PythaeEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(7, 2 * D)

    def forward(self, x):
        mu, lv = self.lin(x).chunk(2, dim=-1)
        return ModelOutput(embedding=mu, log_covariance=lv)


class PythaeDecoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(D, 7)

    def forward(self, z):
        return ModelOutput(reconstruction=self.lin(z))


def test_pythae_style_networks_plug_in():
    cfg = MVTCAEConfig(n_modalities=2, latent_dim=D)
    model = MVTCAE(
        cfg,
        encoders={"x": PythaeEncoder(), "y": PythaeEncoder()},
        decoders={"x": PythaeDecoder(), "y": PythaeDecoder()},
    )
    b = MultimodalBatch(data={"x": torch.randn(3, 7), "y": torch.randn(3, 7)})
    assert torch.isfinite(model(b).loss)
    assert model.predict(b, "x", "y")["y"].shape == (3, 7)
    assert cfg.custom_architectures == ["encoders", "decoders"]


def test_batch_type_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="disagree on batch size"):
        MultimodalBatch(data={"a": torch.zeros(3, 2), "b": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="masks\\['a'\\] has shape"):
        MultimodalBatch(data={"a": torch.zeros(3, 2)}, masks={"a": torch.ones(4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no data"):
        MultimodalBatch(data={"a": torch.zeros(3, 2)}, masks={"b": torch.ones(3, dtype=torch.bool)})


def test_select_keeps_per_row_meta_aligned():
    import numpy as np

    b = MultimodalBatch(
        data={"a": torch.arange(5.0).unsqueeze(1)},
        labels=torch.arange(5),
        meta={
            "sample_id": np.array([10, 11, 12, 13, 14]),
            "ids_t": torch.arange(5) + 20,
            "name": "x",
        },
    )
    sub = b.select(torch.tensor([True, False, True, False, True]))
    assert sub.meta["sample_id"].tolist() == [10, 12, 14]
    assert sub.meta["ids_t"].tolist() == [20, 22, 24]
    assert sub.meta["name"] == "x"
    assert sub.select(slice(1, 3)).meta["sample_id"].tolist() == [12, 14]
    assert sub.labels.tolist() == [0, 2, 4] and sub.data["a"].squeeze(1).tolist() == [0, 2, 4]
