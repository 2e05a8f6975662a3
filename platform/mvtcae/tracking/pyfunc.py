"""The MLflow pyfunc face of a trained MVTCAE: encode and cross-modal predict requests.

The model is logged *from code* (``mvtcae/tracking/model_code.py``) with one artifact,
``model_dir`` (``model_config.json`` + ``model.safetensors``): loading executes no pickle.

Request, the MLflow way (the model's signature says it; MLflow checks requests against it):

- **inputs**: a DataFrame with one row per sample and one column per conditioning modality,
  each cell that sample's values flattened to ``prod(shape)`` floats (model scale; images in
  [0, 1]). Columns are optional: send the modalities you condition on.
- **params**: ``task`` (``encode`` | ``predict``; default ``auto``: predict when ``gen_mod``
  is given, else encode), ``cond_mod`` (comma-separated names or ``all``; default: every
  modality in the inputs), ``gen_mod`` (comma-separated names or ``all``; predict only),
  ``return_mean`` (default true; false draws one posterior sample), ``seed`` (for
  ``return_mean=false``; default -1: unseeded).

Over REST (``mlflow models serve``) that is ``{"dataframe_split": {"columns": [...], "data":
[...]}, "params": {...}}`` (or ``dataframe_records``); the README has a ``curl`` example. A
request the model cannot answer comes back as HTTP 400 with a message naming the modality or
option at fault. In Python, ``loaded.predict(frame, params={...})``.

Without a signature (a model logged before signatures, or `parse_request` used directly) a dict
with ``(n, *shape)`` arrays and the options as keys is still understood.

Response: ``{"z": (n, latent_dim)}`` for encode; ``{m: (n, *shape)}`` for predict, each the
mean of the decoder distribution (sigmoid of the logits for bernoulli, softmax over the last
dim for categorical). Everything is float32 NumPy. Load on a GPU with
``mlflow.pyfunc.load_model(uri, model_config={"device": "cuda"})``;
``loaded.unwrap_python_model().mvtcae`` is the underlying `MVTCAE` object.

What loading the pyfunc executes: ``mlflow.pyfunc.load_model`` puts the ``code/`` copy of the
``mvtcae`` package logged with the model first on ``sys.path`` and runs the model's code file
(``mvtcae/tracking/model_code.py`` as stored in the artifact: models-from-code); then
`MVTCAEPythonModel.load_context` rebuilds the networks from ``model_dir``. Loading a pyfunc
therefore runs code kept in the registry: load pyfunc models only from registries whose
writers you trust. The network rebuild itself follows `MVTCAE.load`'s trust rule: custom
networks come only from ``mvtcae`` and the modules named in ``MVTCAE_TRUSTED_MODULES`` or in
``model_config={"trusted_modules": ["pkg"]}`` (MLflow passes on only the ``model_config`` keys
recorded at logging time, so for models logged without them only the variable works). To read
a registered model without running any of its code, use `mvtcae.tracking.load_champion` or
`mvtcae.tracking.load_model_from`: they read only the JSON + safetensors files and import
nothing from the artifact.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from mvtcae.model.batch import MultimodalBatch
from mvtcae.model.likelihoods import decoder_mean
from mvtcae.model.mvtcae import MVTCAE
from mvtcae.safety.trust import platform_trusted_modules

OPTION_KEYS = ("task", "cond_mod", "gen_mod", "return_mean", "seed")
TASKS = ("encode", "predict")


class RequestError(ValueError):
    """A pyfunc request that the model cannot answer; the message says what to change."""


@dataclass
class Request:
    """A parsed pyfunc request."""

    task: str
    cond_mod: list[str]
    gen_mod: list[str]
    inputs: dict[str, np.ndarray]
    return_mean: bool = True
    seed: int | None = None


def _scalar(value: Any) -> Any:
    """Unwrap one-element arrays/lists/Series (as REST and DataFrames deliver options)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    return value


def _names(value: Any, modalities: list[str], field: str) -> list[str]:
    value = value.tolist() if hasattr(value, "tolist") else value
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if value == ["all"]:
        return list(modalities)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise RequestError(
            f"{field} must be 'all', a modality name or a list of names, got {value!r}"
        )
    unknown = [v for v in value if v not in modalities]
    if unknown:
        raise RequestError(f"{field}: unknown modalities {unknown}; the model has {modalities}")
    return list(value)


def _as_mapping(model_input: Any) -> dict[str, Any]:
    if isinstance(model_input, pd.DataFrame):
        out: dict[str, Any] = {}
        for column in model_input.columns:
            values = model_input[column].tolist()
            out[column] = values[0] if column in OPTION_KEYS else values
        return out
    if isinstance(model_input, Mapping):
        return dict(model_input)
    raise RequestError(
        f"request of type {type(model_input).__name__}: send a dict or a pandas DataFrame"
    )


def _modality_array(values: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        array = np.asarray(
            values if not isinstance(values, list) else [np.asarray(v) for v in values]
        )
    except ValueError:  # ragged rows
        raise RequestError(
            f"modality {name!r}: rows differ in length; each row holds {int(np.prod(shape))} values"
        ) from None
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    array = array.astype(np.float32)
    n = array.shape[0] if array.ndim else 0
    if array.ndim == 0 or array.size != n * int(np.prod(shape)):
        raise RequestError(
            f"modality {name!r}: got an array of shape {array.shape}, expected (n, {shape}) "
            f"or (n, {int(np.prod(shape))})"
        )
    return array.reshape(n, *shape)


# The request options as MLflow params, with defaults that mean "not given".
PARAM_DEFAULTS: dict[str, Any] = {
    "task": "auto",
    "cond_mod": "",
    "gen_mod": "",
    "return_mean": True,
    "seed": -1,
}
_UNSET = {"task": "auto", "cond_mod": "", "gen_mod": "", "seed": -1}


def request_signature(input_dims: Mapping[str, tuple[int, ...]]) -> Any:
    """The MLflow signature of the pyfunc: one optional float-array column per modality, the
    options as params."""
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {
        "task": DataType.string,
        "cond_mod": DataType.string,
        "gen_mod": DataType.string,
        "return_mean": DataType.boolean,
        "seed": DataType.long,
    }
    return ModelSignature(
        inputs=Schema(
            [ColSpec(Array(DataType.double), name=m, required=False) for m in input_dims]
        ),
        params=ParamSchema([ParamSpec(k, kinds[k], v) for k, v in PARAM_DEFAULTS.items()]),
    )


def input_example(input_dims: Mapping[str, tuple[int, ...]], rows: int = 2) -> pd.DataFrame:
    """A request of ``rows`` samples in the signature's form (mid-range values, every modality)."""
    return pd.DataFrame(
        {
            m: [np.full(int(np.prod(shape)), 0.5) for _ in range(rows)]
            for m, shape in input_dims.items()
        }
    )


def parse_request(
    model_input: Any, input_dims: Mapping[str, tuple[int, ...]], params: Mapping | None = None
) -> Request:
    """Turn a DataFrame (or dict) request and its params into a `Request`, checking names and
    shapes; a param at its "not given" default leaves the option to the request or the default."""
    raw = _as_mapping(model_input)
    unknown_params = sorted(set(params or {}) - set(PARAM_DEFAULTS))
    if unknown_params:
        raise RequestError(
            f"unknown params {unknown_params}; the options are {list(PARAM_DEFAULTS)}"
        )
    for key, value in (params or {}).items():
        if key in _UNSET and value == _UNSET[key]:
            continue
        raw[key] = value
    modalities = list(input_dims)
    unknown = [k for k in raw if k not in OPTION_KEYS and k not in input_dims]
    if unknown:
        raise RequestError(
            f"request keys {unknown} are neither options {list(OPTION_KEYS)} nor modalities {modalities}"
        )
    inputs = {m: _modality_array(raw[m], m, tuple(input_dims[m])) for m in modalities if m in raw}
    if not inputs:
        raise RequestError(f"request carries no modality data; give one of {modalities}")
    if len({a.shape[0] for a in inputs.values()}) != 1:
        raise RequestError(
            f"modalities disagree on rows: { {m: a.shape[0] for m, a in inputs.items()} }"
        )
    task = _scalar(raw.get("task", "predict" if "gen_mod" in raw else "encode"))
    if task not in TASKS:
        raise RequestError(f"task must be one of {TASKS}, got {task!r}")
    cond = _names(raw["cond_mod"], modalities, "cond_mod") if "cond_mod" in raw else list(inputs)
    missing = [m for m in cond if m not in inputs]
    if missing:
        raise RequestError(f"cond_mod names {missing} but the request carries no data for them")
    gen = _names(raw.get("gen_mod", "all"), modalities, "gen_mod")
    seed = _scalar(raw.get("seed"))
    return Request(
        task=task,
        cond_mod=cond,
        gen_mod=gen,
        inputs={m: inputs[m] for m in cond},
        return_mean=bool(_scalar(raw.get("return_mean", True))),
        seed=None if seed is None else int(seed),
    )


def answer(model: Any, request: Request) -> dict[str, np.ndarray]:
    """Run an encode or predict request through an `MVTCAE` and return NumPy arrays."""
    device = next(model.parameters()).device
    batch = MultimodalBatch(data={m: torch.from_numpy(a) for m, a in request.inputs.items()})
    batch = batch.to(device)
    generator_state = torch.random.get_rng_state()
    if request.seed is not None:
        torch.manual_seed(request.seed)
    try:
        with torch.no_grad():
            if request.task == "encode":
                out = model.encode(
                    batch, cond_mod=request.cond_mod, return_mean=request.return_mean
                )
                return {"z": out.z.float().cpu().numpy()}
            generated = model.predict(
                batch,
                cond_mod=request.cond_mod,
                gen_mod=request.gen_mod,
                return_mean=request.return_mean,
            )
    finally:
        if request.seed is not None:
            torch.random.set_rng_state(generator_state)
    return {
        m: decoder_mean(x, model.model_config.distribution(m)).float().cpu().numpy()
        for m, x in generated.items()
    }


def _module_names(value: Any) -> list[str]:
    """``model_config["trusted_modules"]`` as a list: model configs given as YAML or on a command
    line often carry one comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [name for name in value.split(",") if name.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"model_config trusted_modules must be a list of names, got {value!r}")
    return list(value)


class MVTCAEPythonModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper: loads the MVTCAE from config + safetensors and answers requests."""

    def __init__(self) -> None:
        self.mvtcae = None

    def load_context(self, context: Any) -> None:
        """Rebuild the MVTCAE from the ``model_dir`` artifact.

        ``model_config`` may give ``device`` and ``trusted_modules`` (a list, or a
        comma-separated string), added to ``MVTCAE_TRUSTED_MODULES`` (see the module docstring).
        """
        config = context.model_config or {}
        device = config.get("device", "cpu")
        trusted = platform_trusted_modules(_module_names(config.get("trusted_modules")))
        model = MVTCAE.load(context.artifacts["model_dir"], trusted_modules=trusted)
        self.mvtcae = model.to(device).eval()

    # A DataFrame hint makes MLflow skip schema inference (a dict is accepted as well), which
    # the request's mix of options and per-modality arrays could not pass.
    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> dict[str, np.ndarray]:
        """Answer an encode / predict request (schema in the module docstring); a request it
        cannot answer raises MLflow's invalid-parameter error (HTTP 400) with the reason."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            request = parse_request(model_input, self.mvtcae.model_config.input_dims, params)
        except RequestError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        return answer(self.mvtcae, request)
