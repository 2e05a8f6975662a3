"""MLflow tracking for the platform: runs, config and evaluation logging, model registry.

The driver process owns one MLflow run per training (`start_run`) and passes its id to the
workers; only rank 0 logs. Nothing here touches MLflow at import time: ``mlflow`` is imported
inside the functions, so ``mvtcae.config`` can import `TrackingConfig` cheaply.

The trained model is logged as an MLflow *model from code* (`mvtcae/mlflow_model_code.py`): the
weights travel as ``model_config.json`` + ``model.safetensors`` artifacts, never pickled. It is
registered under `TrackingConfig.registered_model_name`, and the promotion gate moves the
``champion`` alias to the new version only when it beats the current champion on
`TrackingConfig.promotion_metric`; otherwise the version gets the ``challenger`` alias. Either
way the comparison is recorded as ``promotion.*`` tags on the version (and on the run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from mvtcae.redaction import redact, redact_text
from mvtcae.run_logger import client_uri, mlflow_client

if TYPE_CHECKING:
    import mlflow
    from mlflow import MlflowClient

    from mvtcae import MVTCAE

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"
_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000


class TrackingConfig(BaseModel):
    """Where and how runs are tracked, and how trained models are registered and promoted."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db",
    )
    experiment_name: str = "mvtcae"
    artifact_location: str | None = Field(
        default=None,
        description="artifact root for a new experiment; None next to a SQLite store: <db dir>/mlartifacts",
    )
    registered_model_name: str | None = Field(
        default="mvtcae", description="registry name; None logs the model without registering it"
    )
    promotion_metric: str = "eval/joint_nll"
    promotion_mode: Literal["min", "max"] = "min"
    log_model: bool = True
    outage_grace_s: float = Field(
        default=120.0,
        ge=0.0,
        description="how long training keeps retrying an unreachable MLflow for the calls it "
        "cannot do without (starting the run, registering the model); metrics are buffered",
    )


@dataclass
class RegisteredVersion:
    """Outcome of logging + registering a model: the version and the promotion decision."""

    name: str
    version: int
    alias: str
    promoted: bool
    comparison: dict[str, Any] = field(default_factory=dict)
    model_uri: str = ""


# ----------------------------------------------------------------------------- URIs and runs


def resolve_tracking_uri(cfg: TrackingConfig | None = None) -> str:
    """Tracking URI from the config, else ``MLFLOW_TRACKING_URI``, else a local SQLite store."""
    from mvtcae.mlflow_auth import apply_credentials_file

    apply_credentials_file()  # credentials for a server with basic auth, from a private file
    uri = (cfg.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    allow_file = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
    looks_like_path = "://" not in uri and (uri[0] in "./~" or os.sep in uri)
    if (uri.startswith("file:") or looks_like_path) and not allow_file:
        raise ValueError(
            f"tracking URI {redact_text(uri)!r} is a file store, which this MLflow version refuses: use "
            "'sqlite:///<absolute path>/mlflow.db' or an 'http://host:port' MLflow server"
        )
    return uri


def resolve_artifact_location(cfg: TrackingConfig, tracking_uri: str) -> str | None:
    """Artifact root for new experiments: the configured one, or ``mlartifacts`` beside SQLite."""
    if cfg.artifact_location:
        location = cfg.artifact_location
        return location if "://" in location else str(Path(location).resolve())
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not db_path.is_absolute():
            db_path = Path.cwd() / db_path
        return str(db_path.resolve().parent / "mlartifacts")
    return None


def client_for(cfg: TrackingConfig | None = None) -> MlflowClient:
    """An `MlflowClient` on the resolved tracking (and registry) URI."""
    return mlflow_client(resolve_tracking_uri(cfg))


def _use_uri(uri: str) -> None:
    """Point the fluent MLflow API at ``uri`` (credentials moved out of it, see client_uri)."""
    import mlflow

    public = client_uri(uri)
    mlflow.set_tracking_uri(public)
    mlflow.set_registry_uri(public)


def ensure_experiment(cfg: TrackingConfig) -> str:
    """Return the id of the configured experiment, creating it (with its artifact root) if new."""
    from mlflow.exceptions import MlflowException

    client = client_for(cfg)
    existing = client.get_experiment_by_name(cfg.experiment_name)
    if existing is not None:
        return existing.experiment_id
    location = resolve_artifact_location(cfg, resolve_tracking_uri(cfg))
    try:
        return client.create_experiment(cfg.experiment_name, artifact_location=location)
    except MlflowException:
        # Another driver created it between the lookup and the create.
        existing = client.get_experiment_by_name(cfg.experiment_name)
        if existing is None:
            raise
        return existing.experiment_id


def start_run(
    cfg: TrackingConfig,
    *,
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> mlflow.ActiveRun:
    """Point MLflow at the tracking URI and start (or resume, with ``run_id``) a run."""
    import mlflow

    _use_uri(resolve_tracking_uri(cfg))
    if run_id is not None:
        return mlflow.start_run(run_id=run_id, tags=dict(tags or {}) or None)
    experiment_id = ensure_experiment(cfg)
    return mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {}) or None
    )


def end_run() -> None:
    """End the active run as FINISHED."""
    import mlflow

    mlflow.end_run()


def end_run_after_error(error: BaseException) -> None:
    """End the active run as FAILED (KILLED for an interrupt) with the error in its
    ``mvtcae.error`` tag. A tracking failure here is logged, never raised over ``error``."""
    import mlflow

    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        if mlflow.active_run() is not None:
            message = redact_text(f"{type(error).__name__}: {error}")[:5000]
            mlflow.set_tag("mvtcae.error", message)
        mlflow.end_run(status=status)
    except Exception as tracking_error:  # noqa: BLE001 - keep the original error in front
        logger.warning(
            "could not mark the MLflow run %s (%s: %s)", status, type(tracking_error).__name__,
            redact_text(str(tracking_error))[:300],
        )  # fmt: skip


def _active_run_id(run_id: str | None) -> str:
    import mlflow

    if run_id is not None:
        return run_id
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("no MLflow run: pass run_id or call inside `with start_run(cfg):`")
    return run.info.run_id


# ----------------------------------------------------------------------------- config, metrics


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested config to ``{"section.key": "value"}`` strings fit for MLflow params."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=f"{name}."))
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        flat[name] = text[:_MAX_PARAM_CHARS]
    return flat


def log_config(
    config: Mapping[str, Any] | BaseModel,
    *,
    run_id: str | None = None,
    tracking: TrackingConfig | None = None,
    artifact_file: str = "config.yaml",
) -> dict[str, str]:
    """Log the config as flattened params plus the full YAML file; return the params."""
    from mlflow.entities import Param

    as_dict = config.model_dump(mode="json") if isinstance(config, BaseModel) else dict(config)
    as_dict = redact(as_dict)  # a URI in the config may carry a password
    params = flatten_config(as_dict)
    run_id = _active_run_id(run_id)
    client = client_for(tracking)
    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), _PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + _PARAMS_PER_BATCH])
    client.log_text(run_id, yaml.safe_dump(as_dict, sort_keys=False), artifact_file)
    return params


def log_metrics(
    metrics: Mapping[str, float],
    *,
    step: int | None = None,
    run_id: str | None = None,
    tracking: TrackingConfig | None = None,
) -> None:
    """Log finite float metrics in one batch. Non-finite values are not logged as metrics: they
    are named in a warning and in the run's ``mvtcae.nonfinite_metrics`` tag."""
    import time

    from mlflow.entities import Metric

    run_id = _active_run_id(run_id)
    now = int(time.time() * 1000)
    finite = {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))}
    items = [Metric(k, v, now, step or 0) for k, v in finite.items()]
    client = client_for(tracking)
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000])
    bad = sorted(k for k in metrics if k not in finite)
    if bad:
        shown = ", ".join(f"{k}={float(metrics[k])}" for k in bad)
        logger.warning("run %s: non-finite metrics not logged: %s", run_id, shown)
        client.set_tag(run_id, "mvtcae.nonfinite_metrics", shown[:5000])


def log_evaluation(
    report: Any,
    *,
    run_id: str | None = None,
    tracking: TrackingConfig | None = None,
    step: int | None = None,
    artifact_dir: str = "evaluation",
) -> None:
    """Log an `EvalReport`: its metrics, its JSON and its plots under ``artifact_dir/``."""
    run_id = _active_run_id(run_id)
    log_metrics(report.metrics, step=step, run_id=run_id, tracking=tracking)
    client = client_for(tracking)
    client.log_text(
        run_id, json.dumps(report.to_dict(), indent=2), f"{artifact_dir}/evaluation.json"
    )
    for path in report.plots.values():
        client.log_artifact(run_id, str(path), artifact_path=f"{artifact_dir}/plots")


# ----------------------------------------------------------------------------- model logging


def _model_code_file() -> Path:
    return Path(__file__).with_name("mlflow_model_code.py")


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    def pin(package: str) -> str:
        return f"{package}=={version(package).split('+')[0]}"

    return [pin(p) for p in ("torch", "mlflow", "safetensors", "numpy", "pandas", "pydantic")]


MODEL_FILES = ("model_config.json", "model.safetensors")
OPTIONAL_MODEL_FILES = ("architecture.json",)


def _model_dir(model_or_dir: MVTCAE | str | Path, scratch: Path) -> Path:
    """A directory holding only the model's files (a checkpoint's optimizer state stays out)."""
    if not isinstance(model_or_dir, (str, Path)):
        model_or_dir.save(str(scratch))
        return scratch
    source = Path(model_or_dir)
    missing = [f for f in MODEL_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"model directory {source} lacks {', '.join(missing)}")
    scratch.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES + OPTIONAL_MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, scratch / name)
    return scratch


def log_pyfunc_model(
    model_or_dir: MVTCAE | str | Path, *, run_id: str | None = None, name: str = MODEL_ARTIFACT_NAME
) -> Any:
    """Log a saved MVTCAE (or a model directory) as a models-from-code pyfunc; return ModelInfo."""
    import mlflow

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = _model_dir(model_or_dir, Path(scratch) / "model_dir")
        with _run_context(run_id):
            return mlflow.pyfunc.log_model(
                name=name,
                python_model=str(_model_code_file()),
                artifacts={"model_dir": str(model_dir)},
                # MLflow lets load_model(..., model_config=...) override only logged keys.
                model_config={"device": "cpu", "trusted_modules": []},
                code_paths=[str(_package_dir())],
                pip_requirements=_pip_requirements(),
                metadata={"weights_format": "safetensors", "framework": "mvtcae"},
            )


@contextmanager
def _run_context(run_id: str | None) -> Iterator[None]:
    """Make ``run_id`` the active run for a block, unless it already is."""
    import mlflow

    active = mlflow.active_run()
    if run_id is None and active is None:
        raise RuntimeError("no MLflow run: pass run_id or call inside `with start_run(cfg):`")
    if run_id is None or (active is not None and active.info.run_id == run_id):
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=active is not None):
        yield


# ----------------------------------------------------------------------------- registry


def log_model_and_register(
    model_or_dir: MVTCAE | str | Path,
    cfg: TrackingConfig | Any,
    metrics: Mapping[str, float] | None = None,
    run_id: str | None = None,
) -> RegisteredVersion | None:
    """Log the model into the run, register it, and apply the champion promotion gate."""
    tracking = _tracking_section(cfg)
    import mlflow

    _use_uri(resolve_tracking_uri(tracking))
    run_id = _active_run_id(run_id)
    info = log_pyfunc_model(model_or_dir, run_id=run_id)
    if not tracking.registered_model_name:
        return None
    version = mlflow.register_model(info.model_uri, tracking.registered_model_name)
    candidate = _candidate_value(tracking, metrics, run_id)
    return promote_if_better(
        tracking, int(version.version), candidate, run_id=run_id, model_uri=info.model_uri
    )


def _tracking_section(cfg: Any) -> TrackingConfig:
    if isinstance(cfg, TrackingConfig):
        return cfg
    section = getattr(cfg, "tracking", None)
    if isinstance(section, TrackingConfig):
        return section
    raise TypeError(
        f"expected a TrackingConfig or a config with .tracking, got {type(cfg).__name__}"
    )


def _candidate_value(
    cfg: TrackingConfig, metrics: Mapping[str, float] | None, run_id: str
) -> float | None:
    if metrics and cfg.promotion_metric in metrics:
        return float(metrics[cfg.promotion_metric])
    run_metrics = client_for(cfg).get_run(run_id).data.metrics
    value = run_metrics.get(cfg.promotion_metric)
    return None if value is None else float(value)


def current_champion(cfg: TrackingConfig) -> tuple[int, float | None] | None:
    """The champion version and its promotion-metric value, or None when there is none."""
    from mlflow.exceptions import MlflowException

    client = client_for(cfg)
    try:
        champion = client.get_model_version_by_alias(cfg.registered_model_name, CHAMPION)
    except MlflowException:
        return None
    return int(champion.version), _version_metric(client, cfg, champion)


def _version_metric(client: MlflowClient, cfg: TrackingConfig, version: Any) -> float | None:
    """A version's promotion value: its recorded tag (None when not finite), else, for versions
    registered without one, its run's metric."""
    tags = version.tags or {}
    if tags.get("promotion.metric") == cfg.promotion_metric and "promotion.candidate" in tags:
        text = tags["promotion.candidate"]
        return float(text) if _is_number(text) else None
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(cfg.promotion_metric)
        return None if value is None else float(value)
    return None


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def decide_promotion(
    candidate: float | None,
    champion: float | None,
    mode: Literal["min", "max"],
    *,
    has_champion: bool,
) -> tuple[bool, str]:
    """Return (promote?, reason): a finite candidate strictly better than the champion's value,
    or than no comparable champion. A candidate without a finite value is never promoted."""
    if candidate is None or not math.isfinite(candidate):
        return False, "candidate has no finite value for the promotion metric"
    if not has_champion:
        return True, "no current champion"
    if champion is None or not math.isfinite(champion):
        return True, "champion has no finite value for the promotion metric"
    better = candidate < champion if mode == "min" else candidate > champion
    relation = "better" if better else "not better"
    return better, f"candidate {candidate:.6g} is {relation} than champion {champion:.6g} ({mode})"


def version_values(cfg: TrackingConfig) -> dict[int, float | None]:
    """Every version of the registered model and its promotion-metric value (None: unknown)."""
    client = client_for(cfg)
    values: dict[int, float | None] = {}
    token = None
    while True:
        page = client.search_model_versions(
            f"name = '{cfg.registered_model_name}'", page_token=token
        )
        for version in page:
            values[int(version.version)] = _version_metric(client, cfg, version)
        token = page.token
        if not token:
            return values


def best_version(values: dict[int, float | None], mode: Literal["min", "max"]) -> int | None:
    """The version with the best finite value (ties: the earliest version), or None."""
    finite = [(v if mode == "min" else -v, n) for n, v in values.items()
              if v is not None and math.isfinite(v)]  # fmt: skip
    return min(finite)[1] if finite else None


def converge_champion(cfg: TrackingConfig, max_rounds: int = 20) -> int | None:
    """Point ``champion`` at the best version by the promotion metric; return it.

    Decides from all versions, writes the alias, then reads again until what it reads agrees
    with what it wrote: registrations that run at the same time each end with such a read, so
    the last alias write always names the best of all recorded versions.
    """
    from mlflow.exceptions import MlflowException

    client = client_for(cfg)
    name = cfg.registered_model_name
    best = None
    for _ in range(max_rounds):
        best = best_version(version_values(cfg), cfg.promotion_mode)
        if best is None:
            return None
        current = current_champion(cfg)
        if current is not None and current[0] == best:
            return best
        try:
            client.set_registered_model_alias(name, CHAMPION, str(best))
        except MlflowException as err:
            # Two writers creating the alias at once: one loses on the store's unique key.
            logger.info("setting %s@%s raced another writer (%s); re-reading", name, CHAMPION, err)
    return best


def _set_alias_once(client: MlflowClient, name: str, alias: str, version: int) -> None:
    """Set an informational alias; losing a race for it to another registration is fine."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as err:
        logger.info("alias %s@%s not set (%s)", name, alias, err)


def _racing(call: Any, tries: int = 3) -> None:
    """A tag write that concurrent registrations may also be making (to the same run, or to the
    former champion): the store's insert-or-update can lose a race on its unique key, and
    another try wins."""
    from mlflow.exceptions import MlflowException

    for attempt in range(tries):
        try:
            call()
            return
        except MlflowException:
            if attempt == tries - 1:
                raise


def promote_if_better(
    cfg: TrackingConfig,
    version: int,
    candidate: float | None,
    *,
    run_id: str | None = None,
    model_uri: str = "",
) -> RegisteredVersion:
    """Record ``version``'s promotion value, then let ``champion`` converge on the best version
    (see `converge_champion`); the version gets ``challenger`` when it is not the champion."""
    client = client_for(cfg)
    name = cfg.registered_model_name
    if not name:
        raise ValueError("tracking.registered_model_name is empty: nothing to promote")
    champion = current_champion(cfg)
    champion_version, champion_value = champion if champion else (None, None)
    _, reason = decide_promotion(
        candidate, champion_value, cfg.promotion_mode, has_champion=champion is not None
    )
    value_tags = {
        "promotion.metric": cfg.promotion_metric,
        "promotion.mode": cfg.promotion_mode,
        "promotion.candidate": "none" if candidate is None else str(candidate),
    }
    for key, value in value_tags.items():  # the value first: concurrent deciders read it
        client.set_model_version_tag(name, str(version), key, value)
    best = converge_champion(cfg)
    promoted = best == version
    if not promoted and best is not None and candidate is not None and math.isfinite(candidate):
        reason = f"version {best} is better on {cfg.promotion_metric} ({cfg.promotion_mode})"
    comparison = {
        "metric": cfg.promotion_metric,
        "mode": cfg.promotion_mode,
        "candidate": candidate,
        "champion": champion_value,
        "champion_version": champion_version,
        "decision": CHAMPION if promoted else CHALLENGER,
        "reason": reason,
    }
    tags = {f"promotion.{k}": "none" if v is None else str(v) for k, v in comparison.items()}
    tags["role"] = comparison["decision"]
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if promoted and champion_version is not None and champion_version != version:
        _racing(lambda: client.set_model_version_tag(
            name, str(champion_version), "role", "former_champion"
        ))  # fmt: skip
    if not promoted:
        _set_alias_once(client, name, CHALLENGER, version)
    if run_id is not None:
        _racing(lambda: client.set_tag(run_id, "promotion.decision", comparison["decision"]))
        _racing(lambda: client.set_tag(run_id, "registered_model", f"{name}/{version}"))
    return RegisteredVersion(
        name=name,
        version=version,
        alias=comparison["decision"],
        promoted=promoted,
        comparison=comparison,
        model_uri=model_uri,
    )


# ----------------------------------------------------------------------------- loading back


def download_model_dir(
    model_uri: str, tracking_uri: str | None = None, dst: str | Path | None = None
) -> Path:
    """Download a logged MVTCAE pyfunc and return its ``model_dir`` (config + safetensors)."""
    import mlflow

    if tracking_uri is not None:
        _use_uri(tracking_uri)
    local = Path(
        mlflow.artifacts.download_artifacts(model_uri, dst_path=None if dst is None else str(dst))
    )
    candidates = list(_find_model_dirs(local))
    if not candidates:
        raise FileNotFoundError(f"{model_uri} holds no model_config.json + model.safetensors")
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
    from mvtcae import MVTCAE
    from mvtcae.trust import platform_trusted_modules

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
    from mvtcae import MVTCAE
    from mvtcae.trust import platform_trusted_modules

    found = next(_find_model_dirs(directory), None) if directory.is_dir() else None
    if found is None:
        raise FileNotFoundError(
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
    from mvtcae import MVTCAE, storage
    from mvtcae.trust import platform_trusted_modules

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
