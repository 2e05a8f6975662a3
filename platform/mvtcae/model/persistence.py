"""Saving and loading MVTCAE models as config JSON + safetensors weights (no pickle)."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import MVTCAEConfig

if TYPE_CHECKING:
    from .mvtcae import MVTCAE

CONFIG_FILE = "model_config.json"
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE_FILE = "architecture.json"


def network_reference(net: nn.Module) -> dict[str, Any]:
    """An importable description of a custom network: ``module:qualname`` plus init kwargs.

    A network that defines a JSON-serialisable ``init_kwargs`` dict is rebuilt with them.
    """
    cls = type(net)
    return {
        "class": f"{cls.__module__}:{cls.__qualname__}",
        "init_kwargs": getattr(net, "init_kwargs", {}),
    }


def build_from_reference(ref: dict[str, Any], where: str) -> nn.Module:
    """Instantiate a network from :func:`network_reference` output."""
    module_name, _, qualname = ref["class"].partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"{where}: cannot import {ref['class']} to rebuild the network ({exc}); make it "
            "importable or pass encoders/decoders to MVTCAE.load"
        ) from exc
    return obj(**ref.get("init_kwargs", {}))


def save_model(model: MVTCAE, dir_path: str | Path) -> None:
    """Write config, weights and (for custom networks) their importable references."""
    out = Path(dir_path)
    out.mkdir(parents=True, exist_ok=True)
    model.model_config.save_json(out / CONFIG_FILE)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model": model.model_name})
    custom = model.model_config.custom_architectures
    if custom:
        refs = {
            part: {m: network_reference(net) for m, net in getattr(model, part).items()}
            for part in custom
        }
        for part in custom:
            for m, ref in refs[part].items():
                if ref["class"].startswith("__main__:") or "<locals>" in ref["class"]:
                    warnings.warn(
                        f"{part}[{m!r}] is {ref['class']}, which cannot be imported later: "
                        "loading will need the networks passed to MVTCAE.load",
                        UserWarning,
                        stacklevel=3,
                    )
        (out / ARCHITECTURE_FILE).write_text(json.dumps(refs, indent=2))


def load_model(
    cls: type[MVTCAE],
    dir_path: str | Path,
    encoders: dict[str, nn.Module] | None,
    decoders: dict[str, nn.Module] | None,
    map_location: str | torch.device,
) -> MVTCAE:
    """Rebuild a model written by :func:`save_model`."""
    src = Path(dir_path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(
                f"{src}: no {name}; is this a directory written by MVTCAE.save?"
            )
    config = MVTCAEConfig.from_json_file(src / CONFIG_FILE)
    nets = {"encoders": encoders, "decoders": decoders}
    refs = None
    for part in config.custom_architectures:
        if nets[part] is None:
            if refs is None:
                refs = json.loads((src / ARCHITECTURE_FILE).read_text())
            nets[part] = {
                m: build_from_reference(ref, f"{src / ARCHITECTURE_FILE} {part}[{m!r}]")
                for m, ref in refs[part].items()
            }
    model = cls(config, encoders=nets["encoders"], decoders=nets["decoders"])
    device = str(map_location)
    state = load_file(str(src / WEIGHTS_FILE), device=device)
    model.load_state_dict(state)
    return model.to(map_location)
