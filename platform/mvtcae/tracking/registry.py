"""Logging a trained MVTCAE as an MLflow model, registering it, and the champion promotion gate.

The model is logged *from code* (``mvtcae/tracking/model_code.py``): the weights travel as
``model_config.json`` + ``model.safetensors`` artifacts, never pickled. It is registered under
`TrackingSection.registered_model_name`. The promotion gate records each version's value of
`TrackingSection.promotion_metric` and points the ``champion`` alias at the best version by a
finite value, re-deciding from all versions so that concurrent registrations converge; a version
that is not the champion gets the ``challenger`` alias. The comparison is recorded as
``promotion.*`` tags on the version (and on the run).

A registered name holds the versions of one dataset: NLLs on different data are not comparable,
so `check_registry_dataset` (before training) and `log_model_and_register` (before registering)
refuse a run whose dataset digest differs from that of the versions already under the name.

One module, over 400 lines: registration, the dataset check and the promotion gate read and
write the same versions and aliases, and each keeps the others' invariants.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from mvtcae.config.tracking import TrackingSection
from mvtcae.model.errors import UserError
from mvtcae.model.model_config import MVTCAEConfig
from mvtcae.safety.values import is_finite_number
from mvtcae.tracking.dataset_lineage import (
    DATASET_DIGEST_TAG,
    DATASET_NAME_TAG,
    DATASET_SOURCE_TAG,
    version_tags,
)
from mvtcae.tracking.mlflow_runs import _active_run_id, _use_uri, client_for, resolve_tracking_uri
from mvtcae.tracking.pyfunc import input_example, request_signature

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from mvtcae import MVTCAE

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
MODEL_ARTIFACT_NAME = "model"
# Versions read to name the other datasets under a registered name: enough to name them all in
# practice, and one request however many versions the name holds.
DATASET_CHECK_VERSIONS = 100


class RegistryDatasetMismatchError(UserError, ValueError):
    """A registered model name already holds versions trained on another dataset."""


@dataclass
class RegisteredVersion:
    """Outcome of logging + registering a model: the version and the promotion decision."""

    name: str
    version: int
    alias: str
    promoted: bool
    comparison: dict[str, Any] = field(default_factory=dict)
    model_uri: str = ""


# ----------------------------------------------------------------------------- model logging


def _model_code_file() -> Path:
    return Path(__file__).with_name("model_code.py")


def _package_dir() -> Path:
    """The ``mvtcae`` package directory, logged with the model as its code."""
    return Path(__file__).resolve().parent.parent


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
        input_dims = MVTCAEConfig.from_json_file(model_dir / "model_config.json").input_dims
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
                signature=request_signature(input_dims),
                input_example=input_example(input_dims),
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
    cfg: TrackingSection | Any,
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
    client = client_for(tracking)
    tags = version_tags(client, run_id)
    _check_version_dataset(client, tracking.registered_model_name, tags, run_id, info.model_uri)
    version = mlflow.register_model(info.model_uri, tracking.registered_model_name, tags=tags)
    candidate = _candidate_value(tracking, metrics, run_id)
    return promote_if_better(
        tracking, int(version.version), candidate, run_id=run_id, model_uri=info.model_uri
    )


def check_registry_dataset(
    cfg: TrackingSection, digest: str, dataset_name: str, *, source: str = ""
) -> None:
    """Refuse a run whose dataset differs from the one the registered name's versions hold.

    Raises `RegistryDatasetMismatchError` when a version of ``cfg.registered_model_name`` carries
    a ``mvtcae.dataset.digest`` tag other than ``digest``. Nothing is checked when registration
    is off or the name is not registered yet. Versions without the tag (registered before
    lineage tags, or from a run that logged no dataset) do not block: their dataset is unknown,
    and refusing every later run over them would leave the name unusable. One search, however
    many versions the name holds.
    """
    name = cfg.registered_model_name
    if not name:
        return
    others = _other_datasets(client_for(cfg), name, digest)
    if others:
        this = _describe_dataset(dataset_name, source, digest)
        raise RegistryDatasetMismatchError(_mismatch_message(name, others, this))


def _other_datasets(client: MlflowClient, name: str, digest: str) -> dict[str, dict[str, Any]]:
    """The datasets, by digest, of ``name``'s versions tagged with a digest other than
    ``digest`` (each with its name, source and version numbers); empty when there are none."""
    # A tag filter matches only versions that carry the tag: untagged versions are left out.
    found = client.search_model_versions(
        f"name = '{name}' AND tags.`{DATASET_DIGEST_TAG}` != '{digest}'",
        max_results=DATASET_CHECK_VERSIONS,
    )
    others: dict[str, dict[str, Any]] = {}
    for version in found:
        tags = version.tags or {}
        other = tags.get(DATASET_DIGEST_TAG)
        if not other or other == digest:
            continue
        entry = others.setdefault(
            other,
            {
                "name": tags.get(DATASET_NAME_TAG, "?"),
                "source": tags.get(DATASET_SOURCE_TAG, ""),
                "versions": [],
            },
        )
        entry["versions"].append(int(version.version))
    return others


def _describe_dataset(name: str, source: str, digest: str) -> str:
    where = f"{source}, " if source else ""
    return f"dataset {name or '?'} ({where}digest {digest[:12]})"


def _mismatch_message(name: str, others: dict[str, dict[str, Any]], this: str) -> str:
    held = "; ".join(
        _describe_dataset(d["name"], d["source"], digest)
        + f" in version{'s' if len(d['versions']) > 1 else ''} "
        + ", ".join(str(v) for v in sorted(d["versions"]))
        for digest, d in others.items()
    )
    return (
        f"registered model {name!r} holds versions trained on {held}; this run trains on "
        f"{this}. Their scores are not comparable, so the promotion gate cannot rank them "
        f"under one name: set tracking.registered_model_name to another name (one per "
        f"dataset), or to null to log the model without registering it"
    )


def _check_version_dataset(
    client: MlflowClient, name: str, tags: Mapping[str, str], run_id: str, model_uri: str
) -> None:
    """At registration, the run's dataset against the name's versions: another run may have
    registered another dataset under the name since this run's check at its start."""
    digest = tags.get(DATASET_DIGEST_TAG)
    if not digest:
        logger.warning(
            "run %s recorded no dataset digest: registering under %r without the dataset check",
            run_id,
            name,
        )
        return
    others = _other_datasets(client, name, digest)
    if others:
        this = _describe_dataset(
            tags.get(DATASET_NAME_TAG, ""), tags.get(DATASET_SOURCE_TAG, ""), digest
        )
        raise RegistryDatasetMismatchError(
            f"{_mismatch_message(name, others, this)}. The model was not registered; it stays "
            f"logged in run {run_id} ({model_uri}) and can be registered under another name "
            f"from there"
        )


def _tracking_section(cfg: Any) -> TrackingSection:
    if isinstance(cfg, TrackingSection):
        return cfg
    section = getattr(cfg, "tracking", None)
    if isinstance(section, TrackingSection):
        return section
    raise TypeError(
        f"expected a TrackingSection or a config with .tracking, got {type(cfg).__name__}"
    )


def _candidate_value(
    cfg: TrackingSection, metrics: Mapping[str, float] | None, run_id: str
) -> float | None:
    if metrics and cfg.promotion_metric in metrics:
        return float(metrics[cfg.promotion_metric])
    run_metrics = client_for(cfg).get_run(run_id).data.metrics
    value = run_metrics.get(cfg.promotion_metric)
    return None if value is None else float(value)


def current_champion(cfg: TrackingSection) -> tuple[int, float | None] | None:
    """The champion version and its promotion-metric value, or None when there is none."""
    from mlflow.exceptions import MlflowException

    client = client_for(cfg)
    try:
        champion = client.get_model_version_by_alias(cfg.registered_model_name, CHAMPION)
    except MlflowException:
        return None
    return int(champion.version), _version_metric(client, cfg, champion)


def _version_metric(client: MlflowClient, cfg: TrackingSection, version: Any) -> float | None:
    """A version's promotion value: its recorded tag (None when not finite), else, for versions
    registered without one, its run's metric."""
    tags = version.tags or {}
    if tags.get("promotion.metric") == cfg.promotion_metric and "promotion.candidate" in tags:
        text = tags["promotion.candidate"]
        return float(text) if is_finite_number(text) else None
    if version.run_id:
        value = client.get_run(version.run_id).data.metrics.get(cfg.promotion_metric)
        return None if value is None else float(value)
    return None


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


def version_values(cfg: TrackingSection) -> dict[int, float | None]:
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
    finite = [
        (v if mode == "min" else -v, n)
        for n, v in values.items()
        if v is not None and math.isfinite(v)
    ]
    return min(finite)[1] if finite else None


def converge_champion(cfg: TrackingSection, max_rounds: int = 20) -> int | None:
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
    cfg: TrackingSection,
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
        _racing(
            lambda: client.set_model_version_tag(
                name, str(champion_version), "role", "former_champion"
            )
        )
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
