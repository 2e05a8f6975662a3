"""save -> load gives the same model, with no pickle anywhere."""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig
from mvtcae.model import UntrustedModuleError


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
        n_modalities=2,
        latent_dim=5,
        input_dims={"img": (1, 12, 12), "v": (4,)},
        decoders_dist={"img": "bernoulli"},
        default_networks=family,
        alpha=0.7,
    )
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
    back = MVTCAE.load(tmp_path / "m", trusted_modules=[TwoHeadEncoder.__module__])
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


# ----------------------------------------------------------------------------- trust on load

# A network module whose import leaves a marker file: it shows whether loading imported it.
THROWAWAY_SOURCE = """
from pathlib import Path

from torch import nn

Path({marker!r}).touch()


class Encoder(nn.Module):
    def __init__(self, n_in, d):
        super().__init__()
        self.init_kwargs = {{"n_in": n_in, "d": d}}
        self.lin = nn.Linear(n_in, 2 * d)

    def forward(self, x):
        return tuple(self.lin(x).chunk(2, dim=-1))


def make_encoder(n_in, d):
    return Encoder(n_in, d)


class NotANetwork:
    def __init__(self, n_in, d):
        self.n_in, self.d = n_in, d
"""


def _two_modality_config() -> MVTCAEConfig:
    return MVTCAEConfig(n_modalities=2, latent_dim=3, input_dims={"a": (4,), "b": (6,)})


def _set_reference(model_dir: Path, modality: str, ref: str, init_kwargs: object) -> None:
    """Point one encoder entry of architecture.json at ``ref``, as a tampered file would."""
    path = model_dir / "architecture.json"
    refs = json.loads(path.read_text())
    refs["encoders"][modality] = {"class": ref, "init_kwargs": init_kwargs}
    path.write_text(json.dumps(refs))


@pytest.fixture
def saved_custom(tmp_path) -> Path:
    """A saved model with custom encoders from this (test) module."""
    encoders = {"a": TwoHeadEncoder(4, 3), "b": TwoHeadEncoder(6, 3)}
    MVTCAE(_two_modality_config(), encoders=encoders).save(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def throwaway(tmp_path, monkeypatch):
    """A saved model whose encoders come from a throwaway module, which is then forgotten.

    Returns (original model, model dir, module name, marker path); the marker exists only
    after the module is imported again.
    """
    name = f"throwaway_nets_{uuid.uuid4().hex[:12]}"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(THROWAWAY_SOURCE.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    torch.manual_seed(0)
    model = MVTCAE(
        _two_modality_config(), encoders={"a": module.Encoder(4, 3), "b": module.Encoder(6, 3)}
    )
    model.save(tmp_path / "m")
    del sys.modules[name]
    marker.unlink()
    yield model, tmp_path / "m", name, marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("ref", "kwargs"),
    [
        ("os:makedirs", lambda out: {"name": str(out)}),
        (
            "subprocess:run",
            lambda out: {"args": [sys.executable, "-c", f"open({str(out)!r}, 'w')"]},
        ),
    ],
)
def test_stdlib_call_in_architecture_is_refused_and_not_run(saved_custom, tmp_path, ref, kwargs):
    out = tmp_path / "pwned"
    _set_reference(saved_custom, "a", ref, kwargs(out))
    with pytest.raises(UntrustedModuleError) as refused:
        MVTCAE.load(saved_custom)
    message = str(refused.value)
    assert f"'{ref}'" in message
    assert "architecture.json encoders['a']" in message
    assert "trusted_modules=" in message and "MVTCAE_TRUSTED_MODULES" in message
    assert not out.exists()


def test_untrusted_module_is_never_imported(throwaway):
    _, model_dir, name, marker = throwaway
    with pytest.raises(UntrustedModuleError, match=f"'{name}:Encoder'"):
        MVTCAE.load(model_dir)
    assert not marker.exists()
    assert name not in sys.modules


def test_trusted_module_is_rebuilt_with_the_same_weights(throwaway):
    model, model_dir, name, marker = throwaway
    back = MVTCAE.load(model_dir, trusted_modules=[name])
    assert marker.exists()
    assert type(back.encoders["a"]).__module__ == name
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_trusted_name_does_not_cover_lookalike_modules(saved_custom):
    """A trusted name covers itself and its dotted submodules, not names that merely start alike."""
    module = TwoHeadEncoder.__module__
    with pytest.raises(UntrustedModuleError):
        MVTCAE.load(saved_custom, trusted_modules=[module[:-1]])
    assert isinstance(MVTCAE.load(saved_custom, trusted_modules=[module]).encoders["a"], nn.Module)


@pytest.mark.parametrize("attribute", ["make_encoder", "NotANetwork"])
def test_trusted_object_must_be_a_module_subclass(throwaway, attribute):
    _, model_dir, name, _ = throwaway
    _set_reference(model_dir, "a", f"{name}:{attribute}", {"n_in": 4, "d": 3})
    with pytest.raises(UntrustedModuleError, match="not an nn.Module subclass"):
        MVTCAE.load(model_dir, trusted_modules=[name])


def test_attribute_walk_into_another_module_is_refused(saved_custom):
    """``mvtcae.<module>:nn.Linear`` reaches torch through a trusted module: still refused."""
    _set_reference(
        saved_custom, "a", "mvtcae.model.networks:nn.Linear", {"in_features": 4, "out_features": 6}
    )
    with pytest.raises(UntrustedModuleError, match="torch.nn.modules.linear"):
        MVTCAE.load(saved_custom)


def test_dunder_attribute_is_refused(throwaway):
    _, model_dir, name, _ = throwaway
    _set_reference(model_dir, "a", f"{name}:Encoder.__base__", {"n_in": 4, "d": 3})
    with pytest.raises(UntrustedModuleError, match="__base__"):
        MVTCAE.load(model_dir, trusted_modules=[name])


def test_init_kwargs_must_be_a_json_object(throwaway):
    _, model_dir, name, _ = throwaway
    _set_reference(model_dir, "a", f"{name}:Encoder", [4, 3])
    with pytest.raises(ValueError, match="init_kwargs must be a JSON object"):
        MVTCAE.load(model_dir, trusted_modules=[name])


def test_platform_checkpoint_loader_honours_the_environment(throwaway, monkeypatch):
    from mvtcae.storage.checkpoints import load_model

    model, model_dir, name, marker = throwaway
    monkeypatch.delenv("MVTCAE_TRUSTED_MODULES", raising=False)
    with pytest.raises(UntrustedModuleError, match="MVTCAE_TRUSTED_MODULES"):
        load_model(model_dir)
    assert not marker.exists()
    monkeypatch.setenv("MVTCAE_TRUSTED_MODULES", f" other.pkg ,, {name} ")
    back = load_model(model_dir)
    torch.testing.assert_close(back.state_dict(), model.state_dict(), rtol=0, atol=0)


def test_platform_directory_loader_honours_the_environment(throwaway, monkeypatch):
    from mvtcae.tracking import load_model_from

    model, model_dir, name, marker = throwaway
    monkeypatch.delenv("MVTCAE_TRUSTED_MODULES", raising=False)
    with pytest.raises(UntrustedModuleError, match=f"'{name}:Encoder'"):
        load_model_from(str(model_dir))
    assert not marker.exists()
    monkeypatch.setenv("MVTCAE_TRUSTED_MODULES", name)
    back = load_model_from(str(model_dir))
    torch.testing.assert_close(back.state_dict(), model.state_dict(), rtol=0, atol=0)
