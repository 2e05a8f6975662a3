"""``MVTCAEConfig``: the validated configuration of an MVTCAE model (multivae-compatible)."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mvtcae.model.errors import UserError

DISTRIBUTIONS = ("normal", "laplace", "bernoulli", "categorical")
SCALED_DISTRIBUTIONS = ("normal", "laplace")
DEFAULT_NETWORKS = ("mlp", "conv")
ARCHITECTURE_PARTS = ("encoders", "decoders")


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field (and modality)."""


@dataclass
class MVTCAEConfig:
    """Configuration of :class:`mvtcae.MVTCAE`; fields and defaults follow multivae's MVTCAEConfig.

    ``default_networks`` is this platform's addition: which default encoder/decoder family to
    build when none are given ("mlp", or "conv" for (C, H, W) modalities; vectors always get MLPs).
    """

    n_modalities: int
    latent_dim: int = 10
    input_dims: dict[str, tuple[int, ...]] | None = None
    uses_likelihood_rescaling: bool = False
    rescale_factors: dict[str, float] | None = None
    decoders_dist: dict[str, str] | None = None
    decoder_dist_params: dict[str, dict[str, float]] | None = None
    custom_architectures: list[str] = field(default_factory=list)
    alpha: float = 0.1
    beta: float = 2.5
    default_networks: str = "mlp"
    name: str = "MVTCAEConfig"

    def __post_init__(self) -> None:
        self._validate_scalars()
        if self.input_dims is not None:
            self.input_dims = _normalise_input_dims(self.input_dims, self.n_modalities)
        self.decoders_dist = self._validate_dists()
        self.decoder_dist_params = self._validate_dist_params()
        self.custom_architectures = list(self.custom_architectures)
        for part in self.custom_architectures:
            if part not in ARCHITECTURE_PARTS:
                raise ConfigError(
                    f"custom_architectures: unknown entry {part!r}; allowed: {ARCHITECTURE_PARTS}"
                )
        if self.rescale_factors is not None:
            self.rescale_factors = self._validate_rescale_factors()
            if not self.uses_likelihood_rescaling:
                warnings.warn(
                    "rescale_factors are given but uses_likelihood_rescaling is False: "
                    "every factor is 1. Set uses_likelihood_rescaling=True to apply them.",
                    UserWarning,
                    stacklevel=3,
                )

    # -- validation -------------------------------------------------------------------------
    def _validate_scalars(self) -> None:
        if isinstance(self.n_modalities, bool) or not isinstance(self.n_modalities, int):
            raise ConfigError(f"n_modalities must be an integer, got {self.n_modalities!r}")
        if self.n_modalities < 1:
            raise ConfigError(f"n_modalities must be >= 1, got {self.n_modalities}")
        if isinstance(self.latent_dim, bool) or not isinstance(self.latent_dim, int):
            raise ConfigError(f"latent_dim must be an integer, got {self.latent_dim!r}")
        if self.latent_dim < 1:
            raise ConfigError(f"latent_dim must be >= 1, got {self.latent_dim}")
        if not _is_number(self.alpha) or not 0.0 <= float(self.alpha) <= 1.0:
            raise ConfigError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if not _is_number(self.beta) or not float(self.beta) > 0.0 or math.isinf(self.beta):
            raise ConfigError(f"beta must be a finite number > 0, got {self.beta!r}")
        self.alpha, self.beta = float(self.alpha), float(self.beta)
        if self.default_networks not in DEFAULT_NETWORKS:
            raise ConfigError(
                f"default_networks must be one of {DEFAULT_NETWORKS}, got {self.default_networks!r}"
            )

    def _check_modality(self, field_name: str, modality: str) -> None:
        if self.input_dims is not None and modality not in self.input_dims:
            raise ConfigError(
                f"{field_name}: {modality!r} is not a modality; "
                f"the modalities (input_dims) are {list(self.input_dims)}"
            )

    def _validate_dists(self) -> dict[str, str] | None:
        if self.decoders_dist is None:
            return None
        out: dict[str, str] = {}
        for modality, dist in dict(self.decoders_dist).items():
            self._check_modality("decoders_dist", modality)
            if dist not in DISTRIBUTIONS:
                raise ConfigError(
                    f"decoders_dist[{modality!r}]: unknown distribution {dist!r}; "
                    f"choose one of {DISTRIBUTIONS}"
                )
            out[modality] = dist
        return out

    def _validate_dist_params(self) -> dict[str, dict[str, float]] | None:
        if self.decoder_dist_params is None:
            return None
        out: dict[str, dict[str, float]] = {}
        for modality, params in dict(self.decoder_dist_params).items():
            self._check_modality("decoder_dist_params", modality)
            params = dict(params)
            for key, value in params.items():
                if key != "scale":
                    raise ConfigError(
                        f"decoder_dist_params[{modality!r}]: unknown parameter {key!r} "
                        "(only 'scale' is supported)"
                    )
                if not _is_number(value) or not float(value) > 0 or math.isinf(value):
                    raise ConfigError(
                        f"decoder_dist_params[{modality!r}]['scale'] must be a finite "
                        f"number > 0, got {value!r}"
                    )
                params[key] = float(value)
            out[modality] = params
        return out

    def _validate_rescale_factors(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for modality, factor in dict(self.rescale_factors or {}).items():
            self._check_modality("rescale_factors", modality)
            if not _is_number(factor) or not float(factor) > 0 or math.isinf(factor):
                raise ConfigError(
                    f"rescale_factors[{modality!r}] must be a finite number > 0, got {factor!r}"
                )
            out[modality] = float(factor)
        return out

    # -- derived values ---------------------------------------------------------------------
    def distribution(self, modality: str) -> str:
        """The decoder distribution of ``modality`` (normal when not given)."""
        return (self.decoders_dist or {}).get(modality, "normal")

    def scale(self, modality: str) -> float:
        """The scale parameter of ``modality``'s decoder distribution (1.0 by default)."""
        return float((self.decoder_dist_params or {}).get(modality, {}).get("scale", 1.0))

    def resolved_rescale_factors(self, modalities: list[str]) -> dict[str, float]:
        """The factor applied to each modality's reconstruction term."""
        if not self.uses_likelihood_rescaling:
            return {m: 1.0 for m in modalities}
        if self.rescale_factors is not None:
            missing = [m for m in modalities if m not in self.rescale_factors]
            if missing:
                raise ConfigError(f"rescale_factors: no factor for modalities {missing}")
            return {m: self.rescale_factors[m] for m in modalities}
        if self.input_dims is None:
            raise ConfigError(
                "uses_likelihood_rescaling=True needs input_dims (or explicit rescale_factors)"
            )
        sizes = {m: math.prod(self.input_dims[m]) for m in modalities}
        largest = max(sizes.values())
        return {m: largest / sizes[m] for m in modalities}

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict of every field (shapes as lists)."""
        out = asdict(self)
        if self.input_dims is not None:
            out["input_dims"] = {m: list(s) for m, s in self.input_dims.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MVTCAEConfig:
        """Build a config from :meth:`to_dict` output (unknown keys are an error)."""
        known = {f.name for f in fields(cls)}
        # multivae writes these bookkeeping keys; they carry no model meaning here.
        ignored = {"uses_default_encoders", "uses_default_decoders"}
        unknown = set(values) - known - ignored
        if unknown:
            raise ConfigError(f"unknown MVTCAEConfig fields: {sorted(unknown)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def save_json(self, path: str | Path) -> None:
        """Write the config as JSON, modalities in their order."""
        # Not sort_keys: the modality order is the order of the networks and so of the model's
        # parameters; a reloaded model must list them as the saved one did (an optimizer state
        # is matched to them, and the product of experts sums in that order).
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_json_file(cls, path: str | Path) -> MVTCAEConfig:
        """Read a config written by :meth:`save_json`."""
        try:
            values = json.loads(Path(path).read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_dict(values)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _normalise_input_dims(input_dims: Any, n_modalities: int) -> dict[str, tuple[int, ...]]:
    if not isinstance(input_dims, dict):
        raise ConfigError(f"input_dims must be a dict of modality -> shape, got {input_dims!r}")
    if len(input_dims) != n_modalities:
        raise ConfigError(
            f"input_dims has {len(input_dims)} modalities {list(input_dims)} "
            f"but n_modalities is {n_modalities}"
        )
    out: dict[str, tuple[int, ...]] = {}
    for modality, shape in input_dims.items():
        if not isinstance(modality, str) or not modality:
            raise ConfigError(f"input_dims: modality names must be non-empty strings: {modality!r}")
        shape = tuple(shape) if hasattr(shape, "__iter__") else (shape,)
        if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
            raise ConfigError(
                f"input_dims[{modality!r}] must be a non-empty tuple of positive ints, got {shape!r}"
            )
        out[modality] = shape
    return out
