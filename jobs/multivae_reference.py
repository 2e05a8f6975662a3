"""The reference library, multivae 1.0.3, imported for comparison (parity tests, benchmarks).

`make install` installs multivae and pythae without their dependencies. Importing multivae pulls
torchvision, nltk and torchmetrics for datasets, metrics and image grids that training an MVTCAE
never calls; while multivae is imported, those three are satisfied by inert placeholder modules
when they are not installed (an installed package always wins), and the placeholders are
dropped from ``sys.modules`` afterwards, so nothing imported later sees them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

UNUSED_BY_MVTCAE = ("torchvision", "nltk", "torchmetrics")


class _Placeholder(types.ModuleType):
    """An inert module: every attribute is another placeholder, calling one returns it, and a
    class may name it as a base. It only has to survive multivae's import."""

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self.__name__}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> _Placeholder:
        return self

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the unused imports; placed after the real finders, so only missing ones."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name.split(".")[0] not in UNUSED_BY_MVTCAE:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec: Any) -> types.ModuleType:
        return _Placeholder(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []


def import_multivae() -> types.SimpleNamespace:
    """multivae's MVTCAE, its config, networks' base classes, dataset and trainer; raises
    ImportError when multivae or pythae is not installed."""
    finder = _PlaceholderFinder()
    sys.meta_path.append(finder)
    try:
        from multivae.data import MultimodalBaseDataset
        from multivae.models import MVTCAE, MVTCAEConfig
        from multivae.trainers import BaseTrainer, BaseTrainerConfig
        from multivae.trainers.base.callbacks import TrainingCallback
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn.base_architectures import BaseDecoder, BaseEncoder
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n, m in sys.modules.items() if isinstance(m, _Placeholder)]:
            del sys.modules[name]
    return types.SimpleNamespace(
        MVTCAE=MVTCAE,
        Config=MVTCAEConfig,
        ModelOutput=ModelOutput,
        BaseEncoder=BaseEncoder,
        BaseDecoder=BaseDecoder,
        Dataset=MultimodalBaseDataset,
        Trainer=BaseTrainer,
        TrainerConfig=BaseTrainerConfig,
        Callback=TrainingCallback,
    )
