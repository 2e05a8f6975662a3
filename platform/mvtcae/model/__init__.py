"""The MVTCAE model in plain PyTorch: no Ray, no MLflow."""

from .batch import MultimodalBatch, as_batch
from .config import ConfigError, MVTCAEConfig
from .mvtcae import MVTCAE
from .output import ModelOutput
from .persistence import UntrustedModuleError

__all__ = [
    "MVTCAE",
    "ConfigError",
    "MVTCAEConfig",
    "ModelOutput",
    "MultimodalBatch",
    "UntrustedModuleError",
    "as_batch",
]
