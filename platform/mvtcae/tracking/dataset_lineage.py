"""Lineage: which dataset a run trained on, and the chain model version -> run -> config -> dataset.

Every training run and sweep trial logs its dataset as an MLflow dataset input (name, the
manifest's content digest, source URI, schema, split sizes) and as run tags; every registered
version copies those tags and names its config. `trace` follows a ``models:/NAME@ALIAS`` (or
``models:/NAME/VERSION``) back along that chain and checks whether the dataset at its source
still has the digest the model was trained on.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from mvtcae.config.locations import normalize
from mvtcae.data import Manifest, load_manifest, validate_dataset
from mvtcae.model.errors import UserError
from mvtcae.safety.redaction import redact_text

DATASET_NAME_TAG = "mvtcae.dataset.name"
DATASET_DIGEST_TAG = "mvtcae.dataset.digest"
DATASET_SOURCE_TAG = "mvtcae.dataset.source"
RUN_TAG = "mvtcae.run_id"
CONFIG_TAG = "mvtcae.config"
CONFIG_ARTIFACT = "config.yaml"
LINEAGE_TAGS = (DATASET_NAME_TAG, DATASET_DIGEST_TAG, DATASET_SOURCE_TAG)
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class LineageError(UserError, ValueError):
    """A model URI that cannot be traced; the message says what is missing."""


def source_uri(dataset_dir: str | Path) -> str:
    """The dataset's location as a URI (``file:///abs/dir`` for a local directory)."""
    text = str(dataset_dir)
    if "://" in text:
        return normalize(text)  # refuses a location with credentials written into it
    return Path(text).resolve().as_uri()


def dataset_entity(manifest: Manifest, dataset_dir: str | Path) -> Any:
    """The MLflow dataset entity of a prepared dataset."""
    from mlflow.entities import Dataset

    source = source_uri(dataset_dir)
    schema = {
        name: {"shape": list(spec.shape), "dtype": spec.dtype, "distribution": spec.distribution}
        for name, spec in manifest.modalities.items()
    }
    profile = {
        "splits": {name: split.num_rows for name, split in manifest.splits.items()},
        "num_bytes": sum(split.num_bytes for split in manifest.splits.values()),
        "num_classes": manifest.num_classes,
    }
    return Dataset(
        name=manifest.name,
        digest=manifest.digest(),
        source_type=urlparse(source).scheme or "local",
        source=json.dumps({"uri": source}),
        schema=json.dumps({"modalities": schema}),
        profile=json.dumps(profile),
    )


def log_dataset(
    client: Any, run_id: str, manifest: Manifest, dataset_dir: str | Path, context: str = "training"
) -> None:
    """Log the dataset as an input of ``run_id`` and tag the run with its name, digest, source."""
    from mlflow.entities import DatasetInput, InputTag, RunTag

    entity = dataset_entity(manifest, dataset_dir)
    client.log_inputs(
        run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])]
    )
    tags = dict(
        zip(LINEAGE_TAGS, (manifest.name, entity.digest, source_uri(dataset_dir)), strict=True)
    )
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def version_tags(client: Any, run_id: str) -> dict[str, str]:
    """The tags a registered version of ``run_id``'s model carries: its dataset, run and config."""
    run_tags = client.get_run(run_id).data.tags
    tags = {k: run_tags[k] for k in LINEAGE_TAGS if k in run_tags}
    tags[RUN_TAG] = run_id
    tags[CONFIG_TAG] = f"runs:/{run_id}/{CONFIG_ARTIFACT}"
    return tags


@dataclass
class Lineage:
    """A registered model version traced back to its run, config and dataset."""

    model_uri: str
    name: str
    version: str
    run_id: str
    run_name: str
    run_status: str
    config_uri: str
    config: dict[str, Any] = field(default_factory=dict)
    dataset_name: str | None = None
    dataset_digest: str | None = None
    dataset_source: str | None = None
    current_digest: str | None = None
    problem: str | None = None  # why the dataset at its source could not be checked / differs

    @property
    def dataset_matches(self) -> bool | None:
        """True/False when the source could be read; None when it could not."""
        if self.current_digest is None:
            return None
        return self.current_digest == self.dataset_digest and self.problem is None


def trace(model_uri: str, client: Any, *, verify_files: bool = True) -> Lineage:
    """Follow ``model_uri`` to its version, run, config and dataset; check the dataset's source
    (with ``verify_files``, every shard's checksum too)."""
    from mlflow.exceptions import MlflowException

    match = _MODEL_URI.match(model_uri)
    if match is None:
        raise LineageError(f"{model_uri!r}: give models:/NAME@ALIAS or models:/NAME/VERSION")
    name, alias = match["name"], match["alias"]
    try:
        if alias:
            version = client.get_model_version_by_alias(name, alias)
        else:
            version = client.get_model_version(name, match["version"])
    except MlflowException as err:
        raise LineageError(f"{model_uri}: {err.message}") from None
    if not version.run_id:
        raise LineageError(f"{model_uri}: version {version.version} names no MLflow run")
    run = client.get_run(version.run_id)
    tags = {**run.data.tags, **(version.tags or {})}
    lineage = Lineage(
        model_uri=model_uri,
        name=name,
        version=str(version.version),
        run_id=run.info.run_id,
        run_name=run.info.run_name or "",
        run_status=run.info.status,
        config_uri=tags.get(CONFIG_TAG, f"runs:/{run.info.run_id}/{CONFIG_ARTIFACT}"),
        dataset_name=tags.get(DATASET_NAME_TAG),
        dataset_digest=tags.get(DATASET_DIGEST_TAG),
        dataset_source=tags.get(DATASET_SOURCE_TAG),
    )
    lineage.config = _read_config(client, run.info.run_id)
    if lineage.dataset_digest is None:
        _from_inputs(lineage, run)
    _check_source(lineage, verify_files)
    return lineage


def _read_config(client: Any, run_id: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        try:
            path = client.download_artifacts(run_id, CONFIG_ARTIFACT, scratch)
        except Exception:  # noqa: BLE001 - a run without a logged config: say so, not fail
            return {}
        return yaml.safe_load(Path(path).read_text()) or {}


def _from_inputs(lineage: Lineage, run: Any) -> None:
    """Runs logged before the lineage tags: take the dataset from the run's MLflow inputs."""
    for item in run.inputs.dataset_inputs if run.inputs else []:
        dataset = item.dataset
        lineage.dataset_name, lineage.dataset_digest = dataset.name, dataset.digest
        try:
            lineage.dataset_source = json.loads(dataset.source).get("uri")
        except (ValueError, AttributeError):
            lineage.dataset_source = dataset.source
        return


def _check_source(lineage: Lineage, verify_files: bool) -> None:
    if not lineage.dataset_source:
        lineage.problem = "the run recorded no dataset"
        return
    try:
        # A local path, file://, s3:// or gs:// URI: read where it is, through pyarrow.
        manifest = load_manifest(lineage.dataset_source)
        lineage.current_digest = manifest.digest()
        if verify_files and lineage.current_digest == lineage.dataset_digest:
            validate_dataset(lineage.dataset_source)
    except Exception as err:  # noqa: BLE001 - reported, not raised: the chain is still useful
        lineage.problem = redact_text(f"{type(err).__name__}: {err}")


def format_lineage(lineage: Lineage) -> str:
    """The chain as the lines ``mvtcae lineage`` prints."""
    config = lineage.config
    shown = {
        key: _get(config, key)
        for key in (
            "name",
            "data.dataset",
            "model.latent_dim",
            "model.alpha",
            "model.beta",
            "train.epochs",
            "train.seed",
        )
    }
    if lineage.dataset_matches is True:
        verdict = "matches: the dataset at its source is the one this model was trained on"
    elif lineage.dataset_matches is False:
        verdict = f"DIFFERS: digest now {lineage.current_digest}" + (
            f" ({lineage.problem})" if lineage.problem else ""
        )
    else:
        verdict = f"not checked: {lineage.problem}"
    return "\n".join(
        [
            f"model    {lineage.model_uri} -> {lineage.name} version {lineage.version}",
            f"run      {lineage.run_id} ({lineage.run_name}, {lineage.run_status})",
            f"config   {lineage.config_uri}",
            "         " + "  ".join(f"{k}={v}" for k, v in shown.items() if v is not None),
            f"dataset  {lineage.dataset_name} digest {lineage.dataset_digest}",
            f"         source {lineage.dataset_source}",
            f"         {verdict}",
        ]
    )


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value
