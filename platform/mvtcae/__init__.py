"""mvtcae-platform: train, tune, track and ship MVTCAE multimodal VAEs on Ray and MLflow.

The model API (``MVTCAE``, ``MVTCAEConfig``, ``MultimodalBatch``) is imported lazily so that the
command line starts without loading torch. It needs torch, safetensors and numpy only; the rest
of the platform needs the ``platform`` extra (``pip install 'mvtcae-platform[platform]'``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MVTCAE", "MVTCAEConfig", "ModelOutput", "MultimodalBatch"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'mvtcae' has no attribute {name!r}")
