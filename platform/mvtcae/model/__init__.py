"""The MVTCAE model in plain PyTorch: no Ray, no MLflow.

The configuration (``MVTCAEConfig``, ``ConfigError``) imports without torch, so that the
platform's configuration layer can validate against it cheaply; the rest loads on first use.
"""

from __future__ import annotations

from typing import Any

from .model_config import DISTRIBUTIONS, ConfigError, MVTCAEConfig

__all__ = [
    "DISTRIBUTIONS",
    "MVTCAE",
    "ConfigError",
    "MVTCAEConfig",
    "ModelOutput",
    "MultimodalBatch",
    "UntrustedModuleError",
    "as_batch",
    "decoder_mean",
]

_LAZY = {
    "MVTCAE": ".mvtcae",
    "MultimodalBatch": ".batch",
    "as_batch": ".batch",
    "ModelOutput": ".output",
    "UntrustedModuleError": ".persistence",
    "decoder_mean": ".likelihoods",
}


def __getattr__(name: str) -> Any:
    # Lazy: these import torch, which the configuration layer does not need.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'mvtcae.model' has no attribute {name!r}")
