"""One dataset per registered name, on a real SQLite MLflow store and real Parquet shards: a run
on another dataset is refused before training and again at registration (its model stays in
the run, the champion stays), the same dataset registers and promotes as before, the registered
name defaults to the experiment's, and a config that turns registering off registers nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from mvtcae.config import TrackingSection, config_from_dict, load_config
from mvtcae.data import load_manifest
from mvtcae.model.errors import UserError
from mvtcae.tracking import client_for, log_model_and_register, start_run
from mvtcae.tracking.dataset_lineage import log_dataset, source_uri
from mvtcae.tracking.registry import RegistryDatasetMismatchError, check_registry_dataset
from testkit import write_tiny_views

REPO = Path(__file__).resolve().parents[2]


def _dataset(directory: Path, name: str, n_train: int = 40) -> Path:
    return write_tiny_views(directory, n_train=n_train, n_test=20, classes=3, width=4, name=name)


def _run(tracking: TrackingSection, model, nll: float, dataset: Path | None):
    """A run that trained on ``dataset`` (None: a run that recorded none, as before lineage)
    and registers its model; returns (run id, outcome or the error raised)."""
    with start_run(tracking, run_name="run") as run:
        if dataset is not None:
            log_dataset(client_for(tracking), run.info.run_id, load_manifest(dataset), dataset)
        mlflow.log_metric("eval/joint_nll", nll)
        try:
            return run.info.run_id, log_model_and_register(model, tracking, {"eval/joint_nll": nll})
        except RegistryDatasetMismatchError as err:
            return run.info.run_id, err


def _logged_models(tracking: TrackingSection, run_id: str) -> list:
    experiment = client_for(tracking).get_run(run_id).info.experiment_id
    return mlflow.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}'",
        output_format="list",
    )


def _champion(tracking: TrackingSection) -> int:
    name = tracking.registered_model_name
    return int(client_for(tracking).get_model_version_by_alias(name, "champion").version)


def test_a_second_dataset_under_one_name_is_refused_before_training_and_at_registration(
    tracking, make_model, tmp_path
):
    first, second = _dataset(tmp_path / "a", "tiny3"), _dataset(tmp_path / "b", "other", 48)
    digest_a, digest_b = load_manifest(first).digest(), load_manifest(second).digest()
    assert digest_a != digest_b
    _, registered = _run(tracking, make_model(0), 3.0, first)
    assert registered.promoted

    check_registry_dataset(tracking, digest_a, "tiny3", source=source_uri(first))  # same: fine
    with pytest.raises(RegistryDatasetMismatchError) as refused:
        check_registry_dataset(tracking, digest_b, "other", source=source_uri(second))
    assert isinstance(refused.value, UserError) and isinstance(refused.value, ValueError)
    message = str(refused.value)
    for part in (
        "'tiny-mvtcae'",
        "tiny3",
        digest_a[:12],
        source_uri(first),
        "version 1",
        "other",
        digest_b[:12],
        "tracking.registered_model_name",
    ):
        assert part in message, part

    # Registered anyway (another run's check passed before the first version existed): the
    # registration refuses it, however much better its score; the champion stays.
    run_id, refused_late = _run(tracking, make_model(1), 0.5, second)
    assert isinstance(refused_late, RegistryDatasetMismatchError)
    message = str(refused_late)
    for part in (
        "tiny3",
        digest_a[:12],
        "other",
        digest_b[:12],
        "not registered",
        run_id,
        "tracking.registered_model_name",
    ):
        assert part in message, part
    client = client_for(tracking)
    versions = client.search_model_versions(f"name = '{tracking.registered_model_name}'")
    assert [int(v.version) for v in versions] == [1]
    assert _champion(tracking) == 1
    assert len(_logged_models(tracking, run_id)) == 1  # the refused model stays in its run


def test_the_same_dataset_registers_and_promotes_as_before(tracking, make_model, tmp_path):
    dataset = _dataset(tmp_path / "a", "tiny3")
    copy = tmp_path / "elsewhere"
    shutil.copytree(dataset, copy)  # the same content in another place: the same digest
    _, untagged = _run(tracking, make_model(0), 9.0, None)  # a version with no dataset tag
    _, first = _run(tracking, make_model(1), 3.0, dataset)
    check_registry_dataset(tracking, load_manifest(copy).digest(), "tiny3")
    _, second = _run(tracking, make_model(2), 2.0, copy)
    assert [v.promoted for v in (untagged, first, second)] == [True, True, True]
    assert (second.version, second.alias) == (3, "champion") and _champion(tracking) == 3
    _, worse = _run(tracking, make_model(3), 4.0, dataset)
    assert (worse.version, worse.alias, worse.promoted) == (4, "challenger", False)
    assert _champion(tracking) == 3


def test_the_default_registered_name_is_the_experiments(tracking, make_model, tmp_path):
    assert TrackingSection().registered_model_name == "mvtcae"
    cfg = TrackingSection(tracking_uri=tracking.tracking_uri, experiment_name="mfeat-runs")
    assert cfg.registered_model_name == "mfeat-runs"
    cfg.experiment_name = "mfeat-study"  # a name not given follows the experiment's
    assert cfg.registered_model_name == "mfeat-study"
    given = load_config(REPO / "jobs" / "configs" / "demo.yaml")
    assert given.tracking.registered_model_name == "mvtcae-demo"
    assert config_from_dict(given.to_dict()).tracking.registered_model_name == "mvtcae-demo"

    _, registered = _run(cfg, make_model(0), 3.0, _dataset(tmp_path / "a", "tiny3"))
    assert (registered.name, registered.version) == ("mfeat-study", 1)
    assert client_for(cfg).get_registered_model("mfeat-study").name == "mfeat-study"
    # An experiment name MLflow could not register under is refused when the config loads.
    with pytest.raises(ValueError, match="tracking.registered_model_name"):
        TrackingSection(experiment_name="/Users/me/mvtcae")
    assert TrackingSection(experiment_name="/Users/me/mvtcae", registered_model_name="m")


def test_a_config_that_turns_registering_off_registers_nothing(tracking, make_model, tmp_path):
    overrides = [
        f"tracking.tracking_uri={tracking.tracking_uri}",
        "tracking.registered_model_name=null",
    ]
    cfg = load_config(REPO / "jobs" / "configs" / "demo.yaml", overrides)
    cfg = config_from_dict(cfg.to_dict())  # what a resumed run or a sweep trial reads back
    off = cfg.tracking
    assert off.registered_model_name is None
    first, second = _dataset(tmp_path / "a", "tiny3"), _dataset(tmp_path / "b", "other", 48)
    _run(
        tracking.model_copy(update={"experiment_name": off.experiment_name}),
        make_model(0),
        3.0,
        first,
    )
    # Nothing to check against when nothing is registered, even beside a name in use.
    check_registry_dataset(off, load_manifest(second).digest(), "other")
    run_id, outcome = _run(off, make_model(1), 2.0, second)
    assert outcome is None
    client = client_for(off)
    assert [m.name for m in client.search_registered_models()] == ["tiny-mvtcae"]
    with pytest.raises(MlflowException):
        client.get_registered_model(off.experiment_name)
    assert len(_logged_models(off, run_id)) == 1
