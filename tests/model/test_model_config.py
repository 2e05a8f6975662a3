"""Every MVTCAEConfig error path names the field and the modality at fault."""

from __future__ import annotations

import json

import pytest

from mvtcae import MVTCAE, MVTCAEConfig
from mvtcae.model import ConfigError

DIMS = {"a": (3, 4, 4), "b": (5,)}


def test_defaults_follow_multivae():
    cfg = MVTCAEConfig(n_modalities=2)
    assert (cfg.latent_dim, cfg.alpha, cfg.beta) == (10, 0.1, 2.5)
    assert cfg.input_dims is None and cfg.decoders_dist is None
    assert cfg.uses_likelihood_rescaling is False and cfg.custom_architectures == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -0.1}, "alpha must be a number in \\[0, 1\\]"),
        ({"alpha": 1.5}, "alpha must be a number in \\[0, 1\\]"),
        ({"beta": 0.0}, "beta must be a finite number > 0"),
        ({"beta": -2}, "beta must be a finite number > 0"),
        ({"latent_dim": 0}, "latent_dim must be >= 1"),
        ({"n_modalities": 0}, "n_modalities must be >= 1"),
        (
            {"input_dims": {"a": (3,)}},
            "input_dims has 1 modalities \\['a'\\] but n_modalities is 2",
        ),
        ({"input_dims": {"a": (3,), "b": (0,)}}, "input_dims\\['b'\\]"),
        ({"decoders_dist": {"c": "normal"}}, "decoders_dist: 'c' is not a modality"),
        (
            {"decoders_dist": {"a": "poisson"}},
            "decoders_dist\\['a'\\]: unknown distribution 'poisson'",
        ),
        (
            {"decoder_dist_params": {"z": {"scale": 1.0}}},
            "decoder_dist_params: 'z' is not a modality",
        ),
        ({"decoder_dist_params": {"a": {"scale": 0}}}, "decoder_dist_params\\['a'\\]\\['scale'\\]"),
        (
            {"decoder_dist_params": {"b": {"scale": -1.0}}},
            "decoder_dist_params\\['b'\\]\\['scale'\\]",
        ),
        ({"decoder_dist_params": {"b": {"loc": 1.0}}}, "unknown parameter 'loc'"),
        ({"default_networks": "resnet"}, "default_networks must be one of"),
        ({"custom_architectures": ["heads"]}, "custom_architectures: unknown entry 'heads'"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    base = {"n_modalities": 2, "input_dims": DIMS}
    with pytest.raises(ConfigError, match=message):
        MVTCAEConfig(**{**base, **kwargs})


def test_omitted_modality_means_normal_with_scale_one():
    cfg = MVTCAEConfig(n_modalities=2, input_dims=DIMS, decoders_dist={"a": "laplace"})
    assert cfg.distribution("a") == "laplace" and cfg.distribution("b") == "normal"
    assert cfg.scale("b") == 1.0


def test_json_round_trip_restores_tuples(tmp_path):
    cfg = MVTCAEConfig(
        n_modalities=2,
        latent_dim=3,
        input_dims=DIMS,
        decoders_dist={"a": "bernoulli"},
        decoder_dist_params={"b": {"scale": 0.5}},
        alpha=0.4,
    )
    cfg.save_json(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["input_dims"]["a"] == [3, 4, 4]
    back = MVTCAEConfig.from_json_file(tmp_path / "c.json")
    assert back == cfg and back.input_dims["a"] == (3, 4, 4)


def test_unknown_json_field_is_an_error():
    with pytest.raises(ConfigError, match="unknown MVTCAEConfig fields: \\['gamma'\\]"):
        MVTCAEConfig.from_dict({"n_modalities": 2, "gamma": 1})


def test_model_needs_input_dims_or_networks():
    with pytest.raises(ConfigError, match="input_dims is required"):
        MVTCAE(MVTCAEConfig(n_modalities=2))


def test_dist_for_unknown_modality_checked_against_networks():
    import torch

    cfg = MVTCAEConfig(n_modalities=1, latent_dim=2, decoders_dist={"q": "normal"})
    with pytest.raises(ConfigError, match="decoders_dist: 'q' is not a modality"):
        MVTCAE(cfg, encoders={"x": torch.nn.Linear(2, 2)}, decoders={"x": torch.nn.Linear(2, 2)})
