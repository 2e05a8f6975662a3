"""The registered pyfunc: loads by alias, answers encode/predict like the MVTCAE, holds no pickle."""

from __future__ import annotations

import importlib
import json
import re
import sys
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig
from mvtcae.config import TrackingSection
from mvtcae.tracking import (
    load_champion,
    log_model_and_register,
    log_pyfunc_model,
    start_run,
)
from mvtcae.tracking.pyfunc import RequestError, parse_request


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A tiny model logged and registered once as champion; returns (model, tracking config)."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("serving")
    tracking = TrackingSection(
        tracking_uri=f"sqlite:///{root}/mlflow.db", registered_model_name="served-mvtcae"
    )
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    model = tiny_model(3)
    with start_run(tracking):
        registered = log_model_and_register(model, tracking, {"eval/joint_nll": 1.0})
    assert registered.alias == "champion"
    yield model, tracking
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])


def _inputs(n: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "img": rng.random((n, 1, 8, 8), dtype=np.float32),
        "vec": (rng.random((n, 5)) > 0.5).astype(np.float32),
    }


def _batch(arrays: dict[str, np.ndarray]) -> MultimodalBatch:
    return MultimodalBatch(data={m: torch.from_numpy(a) for m, a in arrays.items()})


def _frame(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """A request in the signature's form: a row per sample, each modality flattened."""
    return pd.DataFrame({m: list(a.reshape(len(a), -1)) for m, a in arrays.items()})


def test_the_logged_model_has_a_signature_and_an_input_example(champion):
    _, tracking = champion
    info = mlflow.models.get_model_info(f"models:/{tracking.registered_model_name}@champion")
    inputs = {s.name: s for s in info.signature.inputs.inputs}
    assert set(inputs) == {"img", "vec"} and not any(s.required for s in inputs.values())
    assert {p.name for p in info.signature.params.params} == {
        "task",
        "cond_mod",
        "gen_mod",
        "return_mean",
        "seed",
    }
    assert info.saved_input_example_info is not None


def test_champion_pyfunc_encodes_like_the_model(champion):
    model, tracking = champion
    loaded = mlflow.pyfunc.load_model(f"models:/{tracking.registered_model_name}@champion")
    x = _inputs()
    got = loaded.predict(_frame(x), params={"task": "encode"})["z"]
    want = model.encode(_batch(x), cond_mod="all", return_mean=True).z.detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)

    got_img = loaded.predict(_frame(x), params={"cond_mod": "img"})["z"]  # task auto: encode
    want_img = model.encode(_batch(x), cond_mod="img", return_mean=True).z.detach().numpy()
    np.testing.assert_allclose(got_img, want_img, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got_img, got)


def test_champion_pyfunc_cross_modal_predict(champion):
    model, tracking = champion
    loaded = mlflow.pyfunc.load_model(f"models:/{tracking.registered_model_name}@champion")
    x = _inputs()
    got = loaded.predict(_frame({"img": x["img"]}), params={"gen_mod": "vec,img"})
    raw = model.predict(
        _batch({"img": x["img"]}), cond_mod="img", gen_mod=["vec", "img"], return_mean=True
    )
    # vec is Bernoulli: the response is its mean, the sigmoid of the decoder's logits.
    np.testing.assert_allclose(got["vec"], torch.sigmoid(raw["vec"]).detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(got["img"], raw["img"].detach().numpy(), atol=1e-6)
    assert got["img"].shape == (6, 1, 8, 8)


def test_a_request_the_model_cannot_answer_names_what_to_change(champion):
    from mlflow.exceptions import MlflowException

    _, tracking = champion
    loaded = mlflow.pyfunc.load_model(f"models:/{tracking.registered_model_name}@champion")
    x = _inputs(2)
    cases = [
        (_frame(x), {"cond_mod": "audio"}, "cond_mod: unknown modalities ['audio']"),
        (_frame({"img": x["img"][:, :, :, :7]}), {}, "modality 'img'"),
        (_frame(x), {"task": "decode"}, "task must be one of"),
    ]
    for frame, params, message in cases:
        with pytest.raises(MlflowException, match=re.escape(message)) as caught:
            loaded.predict(frame, params=params)
        assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def test_load_champion_returns_the_same_weights(champion):
    model, tracking = champion
    back = load_champion(tracking.registered_model_name, tracking.tracking_uri)
    assert type(back).__name__ == "MVTCAE"
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


def test_logged_model_holds_config_and_safetensors_not_pickles(champion, tmp_path):
    _, tracking = champion
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{tracking.registered_model_name}@champion", dst_path=str(tmp_path / "m")
        )
    )
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert "artifacts/model_dir/model.safetensors" in files
    assert "artifacts/model_dir/model_config.json" in files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".pth", ".cloudpickle"))]
    assert (
        json.loads((local / "artifacts/model_dir/model_config.json").read_text())["latent_dim"] == 4
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        ({"task": "encode"}, "no modality data"),
        ({"task": "decode", "img": np.zeros((1, 64))}, "task must be one of"),
        ({"cond_mod": ["vec"], "img": np.zeros((1, 64))}, "no data for them"),
        ({"img": np.zeros((2, 63))}, "expected"),
        ({"gen_mod": ["audio"], "img": np.zeros((1, 64))}, "unknown modalities"),
        ({"colour": 1, "img": np.zeros((1, 64))}, "neither options"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(request_, message):
    with pytest.raises(RequestError, match=message):
        parse_request(request_, {"img": (1, 8, 8), "vec": (5,)})


def test_rest_json_body_parses_and_answers(make_model):
    """The body `mlflow models serve` receives becomes the same request as a Python dict."""
    import io

    from mlflow.pyfunc.scoring_server import infer_and_parse_data, predictions_to_json

    from mvtcae.tracking.pyfunc import answer

    model = make_model(6)
    x = _inputs(3)
    body = {
        "inputs": {
            "task": "predict",
            "cond_mod": ["img"],
            "gen_mod": ["vec"],
            "img": x["img"].tolist(),
        }
    }
    request = parse_request(infer_and_parse_data(body), model.model_config.input_dims)
    assert (request.task, request.cond_mod, request.gen_mod) == ("predict", ["img"], ["vec"])
    buffer = io.StringIO()
    predictions_to_json(answer(model, request), buffer)
    vec = np.asarray(json.loads(buffer.getvalue())["predictions"]["vec"])
    raw = model.predict(_batch({"img": x["img"]}), cond_mod="img", gen_mod="vec", return_mean=True)
    np.testing.assert_allclose(vec, torch.sigmoid(raw["vec"]).detach().numpy(), atol=1e-6)


# A custom encoder living outside the mvtcae package, as a user's own network code would.
CUSTOM_NETS_SOURCE = """
from torch import nn


class Encoder(nn.Module):
    def __init__(self, n_in, d):
        super().__init__()
        self.init_kwargs = {"n_in": n_in, "d": d}
        self.lin = nn.Linear(n_in, 2 * d)

    def forward(self, x):
        return tuple(self.lin(x).chunk(2, dim=-1))
"""


def test_pyfunc_rebuilds_custom_networks_only_from_trusted_modules(tracking, tmp_path, monkeypatch):
    name = f"pyfunc_nets_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(CUSTOM_NETS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))  # the pyfunc loads in this very process
    monkeypatch.delenv("MVTCAE_TRUSTED_MODULES", raising=False)
    nets = importlib.import_module(name)
    torch.manual_seed(0)
    config = MVTCAEConfig(n_modalities=2, latent_dim=3, input_dims={"a": (4,), "b": (6,)})
    model = MVTCAE(config, encoders={"a": nets.Encoder(4, 3), "b": nets.Encoder(6, 3)}).eval()
    with start_run(tracking):
        info = log_pyfunc_model(model)
    del sys.modules[name]
    try:
        with pytest.raises(Exception) as refused:
            mlflow.pyfunc.load_model(info.model_uri)
        # MLflow may wrap the error; its message still names the reference and the way out.
        assert f"'{name}:Encoder'" in str(refused.value)
        assert "trusted_modules" in str(refused.value)
        assert name not in sys.modules

        loaded = mlflow.pyfunc.load_model(info.model_uri, model_config={"trusted_modules": [name]})
        x = np.random.default_rng(0).random((3, 4), dtype=np.float32)
        got = loaded.predict(_frame({"a": x}), params={"task": "encode"})["z"]
        want = model.encode(_batch({"a": x}), cond_mod="a", return_mean=True).z.detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    finally:
        sys.modules.pop(name, None)


IMPORT_PROBE = """
import importlib.metadata, json, runpy, sys
import mlflow.pyfunc, mlflow.models  # what MLflow itself brings is covered by its own pin
before = set(sys.modules)
sys.path.insert(0, sys.argv[2])  # the logged code/ copy first, as MLflow loads it
runpy.run_path(sys.argv[1])  # the models-from-code file, as the server runs it
new = {m.split(".")[0] for m in set(sys.modules) - before}
third = [m for m in new if m not in sys.stdlib_module_names and not m.startswith("_")]
dists = importlib.metadata.packages_distributions()
print(json.dumps(sorted({d for m in third if m != "mvtcae" for d in dists.get(m, [m])})))
"""


def test_the_requirements_cover_what_the_serving_code_imports(champion, tmp_path):
    import subprocess

    _, tracking = champion
    local = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{tracking.registered_model_name}@champion", dst_path=str(tmp_path / "m")
        )
    )
    required = {
        line.split("==")[0].strip().lower()
        for line in (local / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, str(local / "model_code.py"), str(local / "code")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    imported = {d.lower() for d in json.loads(out.stdout.strip().splitlines()[-1])}
    assert imported, "the probe saw no import"
    assert imported <= required, f"imported but not required: {imported - required}"
