"""Loading a logged or saved MVTCAE back: from the registry, a run, or a (checkpoint) directory.

These loaders read only ``model_config.json`` + ``model.safetensors`` (and an architecture file
naming networks of trusted modules); they never import code stored with a logged model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

from mvtcae import storage
from mvtcae.model.errors import UserError
from mvtcae.model.mvtcae import MVTCAE
from mvtcae.safety.redaction import redact_text
from mvtcae.safety.trust import platform_trusted_modules
from mvtcae.tracking.mlflow_runs import _use_uri, resolve_tracking_uri
from mvtcae.tracking.registry import CHAMPION


class ModelNotFoundError(UserError, FileNotFoundError):
    """No saved or logged model where the user pointed."""


def download_model_dir(
    model_uri: str, tracking_uri: str | None = None, dst: str | Path | None = None
) -> Path:
    """Download a logged MVTCAE pyfunc and return its ``model_dir`` (config + safetensors)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri is not None:
        _use_uri(tracking_uri)
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(
                model_uri, dst_path=None if dst is None else str(dst)
            )
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        where = redact_text(tracking_uri or mlflow.get_tracking_uri())
        raise ModelNotFoundError(
            f"{model_uri}: not found in the MLflow store {where} ({err.message.splitlines()[0]}); "
            "check the name and alias or version, and the tracking URI (--config or "
            "--set tracking.tracking_uri=..., or MLFLOW_TRACKING_URI)"
        ) from None
    candidates = list(_find_model_dirs(local))
    if not candidates:
        raise ModelNotFoundError(f"{model_uri} holds no model_config.json + model.safetensors")
    return candidates[0]


def _find_model_dirs(root: Path) -> Iterator[Path]:
    """Directories under ``root`` holding a saved MVTCAE, shallowest first."""
    configs = sorted(root.rglob("model_config.json"), key=lambda p: (len(p.parts), str(p)))
    for config in configs:
        if (config.parent / "model.safetensors").is_file():
            yield config.parent


def load_champion(
    name: str,
    tracking_uri: str | None = None,
    *,
    alias: str = CHAMPION,
    device: str = "cpu",
    trusted_modules: list[str] | None = None,
) -> MVTCAE:
    """The registered model's ``alias`` version (default: the champion) as an `MVTCAE` object.

    Reads only the JSON + safetensors files, never the logged code; custom networks are
    rebuilt only from ``mvtcae``, ``MVTCAE_TRUSTED_MODULES`` and ``trusted_modules``.
    """
    uri = tracking_uri or resolve_tracking_uri(None)
    trusted = platform_trusted_modules(trusted_modules)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = download_model_dir(f"models:/{name}@{alias}", uri, dst=scratch)
        model = MVTCAE.load(model_dir, trusted_modules=trusted)
    return model.to(device).eval()


def _load_from_directory(
    directory: Path, shown: str, *, trusted_modules: list[str] | None = None
) -> MVTCAE:
    """The first saved MVTCAE under ``directory`` (networks from trusted modules only)."""
    found = next(_find_model_dirs(directory), None) if directory.is_dir() else None
    if found is None:
        raise ModelNotFoundError(
            f"{shown}: no model_config.json + model.safetensors found; give a model or "
            "checkpoint directory (local or s3://, gs://, file://), or an MLflow URI such as "
            "models:/<name>@champion"
        )
    return MVTCAE.load(str(found), trusted_modules=platform_trusted_modules(trusted_modules))


def load_model_from(
    ref: str | Path,
    tracking_uri: str | None = None,
    *,
    device: str = "cpu",
    trusted_modules: list[str] | None = None,
) -> MVTCAE:
    """An `MVTCAE` from a model/checkpoint directory (local, or in run storage such as s3://…)
    or an MLflow URI (models:/…, runs:/…).

    Reads only the JSON + safetensors files, never code logged with a model; custom networks
    are rebuilt only from ``mvtcae``, ``MVTCAE_TRUSTED_MODULES`` and ``trusted_modules``."""
    text = str(ref)
    trusted = platform_trusted_modules(trusted_modules)
    if "://" not in text and ":/" not in text:
        return _load_from_directory(Path(text), text, trusted_modules=trusted).to(device).eval()
    if text.split("://", 1)[0].lower() in storage.URI_SCHEMES:  # run storage: s3://, gs://, …
        with storage.local_directory(storage.normalize(text)) as directory:
            model = _load_from_directory(directory, text, trusted_modules=trusted)
            return model.to(device).eval()
    uri = tracking_uri or resolve_tracking_uri(None)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = download_model_dir(text, uri, dst=scratch)
        model = MVTCAE.load(str(model_dir), trusted_modules=trusted)
    return model.to(device).eval()
