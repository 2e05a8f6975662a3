"""Saving and loading MVTCAE models as config JSON + safetensors weights (no pickle)."""

from __future__ import annotations

import importlib
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mvtcae.model.errors import UserError

from .model_config import MVTCAEConfig

# The model class, passed in by MVTCAE.load: this module never imports it (no import cycle).
M = TypeVar("M", bound=nn.Module)

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


class ModelFileError(UserError, ValueError):
    """A model directory whose files cannot be read as a model."""


class UntrustedModuleError(UserError, ValueError):
    """A saved model names a network that loading refuses to rebuild (see `trusted_names`)."""


# The package's own modules are always trusted: their networks ship with the library.
OWN_PACKAGE = __name__.split(".")[0]
TRUST_ENV_VAR = "MVTCAE_TRUSTED_MODULES"  # read by the platform's loaders, not here


def trusted_names(trusted_modules: Iterable[str] | None) -> tuple[str, ...]:
    """The package's own name plus the caller's module names, stripped, blanks dropped."""
    if isinstance(trusted_modules, str):
        # A bare string would be iterated character by character: refuse rather than guess.
        raise TypeError(f"trusted_modules must be a list of module names, not {trusted_modules!r}")
    names = [OWN_PACKAGE]
    for name in trusted_modules or ():
        if not isinstance(name, str):
            raise TypeError(f"trusted_modules entries must be strings, got {name!r}")
        if name.strip() and name.strip() not in names:
            names.append(name.strip())
    return tuple(names)


def is_trusted(module_name: str, trusted: Iterable[str]) -> bool:
    """Whether ``module_name`` is a trusted name or a dotted submodule of one."""
    return any(module_name == t or module_name.startswith(t + ".") for t in trusted)


def _refusal(ref: str, where: str, reason: str, module_name: str | None) -> UntrustedModuleError:
    """An error naming the reference, where it was read, why, and how (if at all) to allow it."""
    head = f"{where}: refusing to rebuild the network from {ref!r}: {reason}"
    if module_name is None:  # no trust setting can make this reference acceptable
        return UntrustedModuleError(
            f"{head}. No trust setting allows such a reference; pass the networks "
            "themselves to MVTCAE.load(path, encoders=..., decoders=...)"
        )
    allow = module_name.split(".")[0]
    return UntrustedModuleError(
        f"{head}. Loading rebuilds nn.Module subclasses only from trusted modules "
        f"({OWN_PACKAGE} and those you name), so that opening a model directory runs no code "
        f"you did not choose. If you trust {allow!r}, allow it with "
        f"MVTCAE.load(path, trusted_modules=[{allow!r}]), or for the platform's loaders "
        f"(workers, evaluation, pyfunc) with the environment variable "
        f"{TRUST_ENV_VAR}={allow}[,other_pkg]"
    )


def _parse_reference(ref: Any, where: str, trusted: tuple[str, ...]) -> tuple[str, list[str]]:
    """Split and check a ``module:qualname`` reference before anything is imported."""
    text = ref.get("class") if isinstance(ref, dict) else None
    if not isinstance(text, str) or ":" not in text:
        raise ValueError(f"{where}: expected {{'class': 'module:Qualname', ...}}, got {ref!r}")
    module_name, _, qualname = text.partition(":")
    parts = qualname.split(".")
    if not all(p.isidentifier() for p in module_name.split(".") + parts):
        raise ValueError(f"{where}: {text!r} is not a 'module:Qualname' reference")
    if not is_trusted(module_name, trusted):
        raise _refusal(text, where, f"module {module_name!r} is not trusted", module_name)
    # Dunder walks (``__globals__``, ``__base__``, ``__subclasses__``...) reach objects that
    # the module never meant to export.
    dunders = [p for p in parts if p.startswith("__")]
    if dunders:
        raise _refusal(text, where, f"it walks through the dunder attribute {dunders[0]!r}", None)
    return module_name, parts


def _init_kwargs(ref: dict[str, Any], where: str) -> dict[str, Any]:
    """The reference's ``init_kwargs``: a JSON object (str keys), empty when absent."""
    kwargs = ref.get("init_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ValueError(f"{where}: init_kwargs must be a JSON object, got {kwargs!r}")
    return kwargs


def build_from_reference(
    ref: dict[str, Any], where: str, trusted_modules: Iterable[str] | None = None
) -> nn.Module:
    """Instantiate a network from :func:`network_reference` output, if its module is trusted.

    Trusted are ``mvtcae`` and its submodules plus ``trusted_modules`` (each name with its
    submodules). An untrusted module is never imported; the object found must be an
    ``nn.Module`` subclass defined in a trusted module. Refusals raise `UntrustedModuleError`.
    """
    trusted = trusted_names(trusted_modules)
    module_name, parts = _parse_reference(ref, where, trusted)
    kwargs = _init_kwargs(ref, where)
    text = ref["class"]
    try:
        obj: Any = importlib.import_module(module_name)
        for part in parts:
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"{where}: cannot import {text} to rebuild the network ({exc}); make it "
            "importable or pass encoders/decoders to MVTCAE.load"
        ) from exc
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise _refusal(text, where, f"it is {type(obj).__name__}, not an nn.Module subclass", None)
    # A trusted module's namespace also holds what it imported (``nn.Linear``, ``os``...):
    # the class itself must be defined in a trusted module.
    defined_in = getattr(obj, "__module__", "") or ""
    if not is_trusted(defined_in, trusted):
        reason = f"the class is defined in {defined_in!r}, which is not trusted"
        raise _refusal(text, where, reason, defined_in)
    return obj(**kwargs)


def write_model_dir(model: nn.Module, dir_path: str | Path) -> None:
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


def read_model_dir(
    cls: type[M],
    dir_path: str | Path,
    encoders: dict[str, nn.Module] | None,
    decoders: dict[str, nn.Module] | None,
    map_location: str | torch.device,
    trusted_modules: Iterable[str] | None = None,
) -> M:
    """Rebuild a model written by :func:`write_model_dir`.

    Custom networks not passed in are rebuilt from ``architecture.json`` only from trusted
    modules (see :func:`build_from_reference`).
    """
    src = Path(dir_path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(
                f"{src}: no {name}; is this a directory written by MVTCAE.save?"
            )
    config = MVTCAEConfig.from_json_file(src / CONFIG_FILE)
    trusted = trusted_names(trusted_modules)
    nets = {"encoders": encoders, "decoders": decoders}
    refs = None
    for part in config.custom_architectures:
        if nets[part] is None:
            if refs is None:
                refs = json.loads((src / ARCHITECTURE_FILE).read_text())
            if not isinstance(refs, dict) or not isinstance(refs.get(part), dict):
                raise ValueError(f"{src / ARCHITECTURE_FILE}: no {part} entry mapping modalities")
            nets[part] = {
                m: build_from_reference(ref, f"{src / ARCHITECTURE_FILE} {part}[{m!r}]", trusted)
                for m, ref in refs[part].items()
            }
    model = cls(config, encoders=nets["encoders"], decoders=nets["decoders"])
    device = str(map_location)
    try:
        state = load_file(str(src / WEIGHTS_FILE), device=device)
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError) as err:  # unreadable, or weights of another model
        raise ModelFileError(
            f"{src / WEIGHTS_FILE}: not the weights of the model {CONFIG_FILE} describes "
            f"({str(err).splitlines()[0][:300]})"
        ) from err
    return model.to(map_location)
