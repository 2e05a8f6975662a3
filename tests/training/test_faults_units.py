"""The fault-handling building blocks without Ray: non-finite steps, checkpoint checksums and
fallback, ranking with NaN, RNG states, exact-name resume lookup, and credential redaction."""

from __future__ import annotations

import json
import math
import pickle
import random
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from mvtcae import MVTCAE, MultimodalBatch
from mvtcae.config import ModelSection, TrainSection, load_config
from mvtcae.data import load_manifest, load_split_arrays
from mvtcae.safety.redaction import redact, redact_text, split_credentials
from mvtcae.storage import runs
from mvtcae.storage.checkpoints import (
    CHECKSUMS,
    CorruptCheckpointError,
    TrainerState,
    capture_rng_state,
    open_intact_checkpoint,
    rank_by_metric,
    read_rng_states,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)
from mvtcae.training import build_optimizer, build_scheduler, model_config_for, run_train_epoch
from mvtcae.training.nonfinite import NonFiniteError, StepGuard


def _batches(dataset: Path, batch_size: int = 64) -> list[MultimodalBatch]:
    arrays = load_split_arrays(dataset, "train")
    data = {m: torch.from_numpy(x).float() for m, x in arrays["data"].items()}
    n = len(arrays["labels"])
    return [
        MultimodalBatch(data={m: x[i : i + batch_size] for m, x in data.items()})
        for i in range(0, n, batch_size)
    ]


def _model(dataset: Path, seed: int = 0) -> MVTCAE:
    torch.manual_seed(seed)
    return MVTCAE(model_config_for(ModelSection(latent_dim=8), load_manifest(dataset)))


def _poisoned(batches: list[MultimodalBatch], at: int) -> list[MultimodalBatch]:
    """The batches with batch ``at`` (0-based) carrying an infinite input value."""
    bad = {m: x.clone() for m, x in batches[at].data.items()}
    bad["v1"][0, 0] = math.inf
    return [*batches[:at], MultimodalBatch(data=bad), *batches[at + 1 :]]


# ---------------------------------------------------------------------------- non-finite
def test_a_non_finite_step_stops_the_epoch_naming_epoch_step_and_terms(tiny_dataset: Path):
    model = _model(tiny_dataset)
    cfg = TrainSection()
    optimizer = build_optimizer(model.parameters(), cfg)
    with pytest.raises(NonFiniteError) as caught:
        run_train_epoch(
            model,
            _poisoned(_batches(tiny_dataset), 2),
            optimizer,
            torch.device("cpu"),
            cfg,
            epoch=4,
        )
    err = caught.value
    assert (err.epoch, err.step) == (4, 3)
    assert "epoch 4, step 3" in str(err) and "recon_v1" in err.terms and "loss" in err.terms
    assert "train.on_nonfinite=skip" in str(err)
    # The bad step's update was never applied: the weights are still finite.
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_policy_drops_bad_steps_within_its_budget(tiny_dataset: Path):
    model = _model(tiny_dataset)
    cfg = TrainSection(on_nonfinite="skip", max_nonfinite_steps=2)
    optimizer = build_optimizer(model.parameters(), cfg)
    batches = _poisoned(_poisoned(_batches(tiny_dataset), 1), 4)
    guard = StepGuard(cfg.on_nonfinite, cfg.max_nonfinite_steps)
    sums = run_train_epoch(model, batches, optimizer, torch.device("cpu"), cfg, guard=guard)
    assert sums["skipped_steps"] == 2 and sums["steps"] == len(batches) - 2
    assert math.isfinite(sums["loss"])
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # A third bad step is over the run's budget.
    with pytest.raises(NonFiniteError, match="3 steps skipped, over train.max_nonfinite_steps=2"):
        run_train_epoch(
            model,
            _poisoned(_batches(tiny_dataset), 0),
            optimizer,
            torch.device("cpu"),
            cfg,
            epoch=2,
            guard=guard,
        )


def test_a_non_finite_gradient_norm_is_caught_too(tiny_dataset: Path):
    model = _model(tiny_dataset)
    cfg = TrainSection(grad_clip_norm=1.0)
    optimizer = build_optimizer(model.parameters(), cfg)
    first = next(iter(model.parameters()))
    first.register_hook(lambda grad: grad * math.inf)  # finite loss, infinite gradient
    with pytest.raises(NonFiniteError) as caught:
        run_train_epoch(model, _batches(tiny_dataset)[:2], optimizer, torch.device("cpu"), cfg)
    assert caught.value.step == 1 and "grad_norm_sum" in caught.value.terms
    assert "loss" not in caught.value.terms


def test_nonfinite_error_survives_a_report_round_trip():
    err = NonFiniteError(3, 17, {"loss": math.nan, "kld_m0": math.inf})
    back = NonFiniteError.from_report(err.to_report())
    assert (back.epoch, back.step) == (3, 17) and str(back) == str(err)
    assert NonFiniteError.from_report({"val/loss": 1.0}) is None
    assert "validation" in str(NonFiniteError(2, None, {"val/loss": math.nan}))


def test_nonfinite_error_survives_pickling():
    # Ray pickles a worker's exception to re-raise it on the driver (and in a Tune trial).
    err = NonFiniteError(1, 2, {"loss": math.nan}, detail="grad norm inf")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, NonFiniteError) and str(back) == str(err)
    assert (back.epoch, back.step, back.detail) == (1, 2, "grad norm inf")


# ---------------------------------------------------------------------------- checkpoints
def _checkpoint(root: Path, dataset: Path, epoch: int, val_loss: float = 1.0) -> Path:
    model = _model(dataset, seed=epoch)
    cfg = TrainSection()
    optimizer = build_optimizer(model.parameters(), cfg)
    scheduler = build_scheduler(optimizer, cfg)
    state = TrainerState(epoch=epoch, metrics={"val/loss": val_loss})
    directory = root / f"checkpoint_epoch_{epoch:04d}"
    save_checkpoint(directory, model, optimizer, scheduler, state, [capture_rng_state()])
    return directory


def test_checksums_catch_truncated_changed_and_missing_files(tiny_dataset: Path, tmp_path: Path):
    ckpt = _checkpoint(tmp_path, tiny_dataset, 1)
    recorded = json.loads((ckpt / CHECKSUMS).read_text())["files"]
    assert set(recorded) == {
        "model_config.json",
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "trainer_state.json",
        "rng_state.json",
    }
    verify_checkpoint(ckpt)
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match=r"model.safetensors: \d+ bytes where"):
        verify_checkpoint(ckpt)
    weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: SHA-256 differs"):
        verify_checkpoint(ckpt)
    verify_checkpoint(ckpt, files=["optimizer.pt"])  # a partial check ignores other files
    weights.unlink()
    with pytest.raises(CorruptCheckpointError, match="model.safetensors: missing"):
        verify_checkpoint(ckpt)
    (ckpt / CHECKSUMS).unlink()
    with pytest.raises(CorruptCheckpointError, match="no checksums.json"):
        verify_checkpoint(ckpt)


def test_restore_falls_back_to_the_newest_intact_checkpoint(tiny_dataset: Path, tmp_path: Path):
    run = tmp_path / "run"
    for epoch in (1, 2, 3):
        _checkpoint(run, tiny_dataset, epoch)
    (run / "checkpoint_epoch_0003" / "model.safetensors").write_bytes(b"truncated")
    fs = pafs.LocalFileSystem()
    with open_intact_checkpoint(fs, str(run / "checkpoint_epoch_0003")) as found:
        assert found.path.endswith("checkpoint_epoch_0002")
        assert len(found.skipped) == 1
        assert "checkpoint_epoch_0003" in found.skipped[0]
        assert "model.safetensors" in found.skipped[0]
    for epoch in (1, 2):
        (run / f"checkpoint_epoch_{epoch:04d}" / "optimizer.pt").write_bytes(b"")
    with (
        pytest.raises(CorruptCheckpointError, match="no intact checkpoint to restore") as caught,
        open_intact_checkpoint(fs, str(run / "checkpoint_epoch_0003")),
    ):
        pass
    message = str(caught.value)
    assert all(f"checkpoint_epoch_000{e}" in message for e in (1, 2, 3))


def test_restore_takes_a_newer_intact_checkpoint_than_the_one_ray_registered(
    tiny_dataset: Path, tmp_path: Path
):
    """An interrupt between a worker's checkpoint write and the controller's record of it leaves
    a newer complete checkpoint than Ray's latest: the run resumes after it, not behind it."""
    run = tmp_path / "run"
    for epoch in (6, 7, 8):
        _checkpoint(run, tiny_dataset, epoch)
    fs = pafs.LocalFileSystem()
    with open_intact_checkpoint(fs, str(run / "checkpoint_epoch_0007")) as found:
        assert found.path.endswith("checkpoint_epoch_0008")
        assert found.skipped == []
    # One that is still being written (no checksums yet) is passed over.
    (run / "checkpoint_epoch_0008" / CHECKSUMS).unlink()
    with open_intact_checkpoint(fs, str(run / "checkpoint_epoch_0007")) as found:
        assert found.path.endswith("checkpoint_epoch_0007")


def test_ranking_puts_missing_and_non_finite_metrics_last():
    entries = [
        ("a", {"val/loss": 3.0}),
        ("nan", {"val/loss": math.nan}),
        ("b", {"val/loss": 1.0}),
        ("none", {}),
        ("inf", {"val/loss": math.inf}),
        ("c", {"val/loss": 2.0}),
    ]
    assert [c for c, _ in rank_by_metric(entries, "val/loss", "min")][:3] == ["b", "c", "a"]
    assert [c for c, _ in rank_by_metric(entries, "val/loss", "max")][:3] == ["a", "c", "b"]
    for mode in ("min", "max"):
        tail = {c for c, _ in rank_by_metric(entries, "val/loss", mode)[3:]}
        assert tail == {"nan", "none", "inf"}


def test_rng_states_round_trip_through_a_checkpoint(tiny_dataset: Path, tmp_path: Path):
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    ckpt = _checkpoint(tmp_path, tiny_dataset, 1)
    expected = (torch.rand(4), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    (state,) = read_rng_states(ckpt)
    restore_rng_state(state)
    got = (torch.rand(4), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert "pickle" not in (ckpt / "rng_state.json").read_text()[:20]  # plain JSON


# ---------------------------------------------------------------------------- resume lookup
def _config(tmp_path: Path, name: str):
    return load_config(None, [f"name={name}", f"train.storage_path={tmp_path / 'runs'}"])


def test_resume_matches_the_run_name_exactly_and_takes_the_newest_start(tmp_path: Path):
    exp, big = _config(tmp_path, "exp"), _config(tmp_path, "exp-big")
    old = runs.create_run(exp, runs.new_run_name("exp"), "run-exp-old")
    time.sleep(0.01)
    newer = runs.create_run(exp, runs.new_run_name("exp"), "run-exp-new")
    time.sleep(0.01)
    runs.create_run(big, runs.new_run_name("exp-big"), "run-exp-big")  # newest, other name
    found = runs.find_latest_run(exp)
    assert (found.name, found.mlflow_run_id) == (newer.name, "run-exp-new")
    assert runs.find_latest_run(big).mlflow_run_id == "run-exp-big"
    assert old.started_at < found.started_at
    assert runs.find_latest_run(_config(tmp_path, "ex")) is None


def test_resume_orders_by_recorded_start_not_by_name(tmp_path: Path):
    cfg = _config(tmp_path, "exp")
    # A clock that went backwards: the later run has the smaller stamp in its name.
    late = datetime(2026, 1, 1, tzinfo=UTC)
    first = runs.create_run(cfg, runs.new_run_name("exp", late + timedelta(days=1)), "first")
    time.sleep(0.01)
    second = runs.create_run(cfg, runs.new_run_name("exp", late), "second")
    assert first.name > second.name
    assert runs.find_latest_run(cfg).mlflow_run_id == "second"


def test_runs_from_before_the_index_are_found_by_exact_name(tmp_path: Path):
    root = tmp_path / "runs"
    for name, run_id in (
        ("exp-20260101-000000-000000", "a"),
        ("exp-20260102-000000-000000", "b"),
        ("exp-big-20260103-000000-000000", "big"),
    ):
        (root / name).mkdir(parents=True)
        (root / name / runs.RUN_STATE_FILE).write_text(json.dumps({"mlflow_run_id": run_id}))
    assert runs.find_latest_run(_config(tmp_path, "exp")).mlflow_run_id == "b"


def test_the_run_state_file_holds_no_password(tmp_path: Path):
    cfg = load_config(
        None,
        [
            f"train.storage_path={tmp_path / 'runs'}",
            "tracking.tracking_uri=http://alice:hunter2@127.0.0.1:5000",
        ],
    )
    record = runs.create_run(cfg, runs.new_run_name("exp"), "rid")
    text = (Path(record.location) / runs.RUN_STATE_FILE).read_text()
    assert "hunter2" not in text and "alice:***@127.0.0.1" in text


# ---------------------------------------------------------------------------- redaction
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://u:p4ss@host:5000/x", "http://u:***@host:5000/x"),
        ("postgresql://bob:s3:cr@t@db:5432/optuna", "postgresql://bob:***@db:5432/optuna"),
        ("sqlite:////tmp/o.db?password=topsecret&x=1", "sqlite:////tmp/o.db?password=***&x=1"),
        ("s3://b/k?secret_key=AKIA&region=eu", "s3://b/k?secret_key=***&region=eu"),
        ("uri http://a:b@h and postgresql://c:d@e", "uri http://a:***@h and postgresql://c:***@e"),
        ("http://user@host", "http://user@host"),
        ("/plain/path", "/plain/path"),
    ],
)
def test_redact_text(text: str, shown: str):
    assert redact_text(text) == shown


def test_redact_walks_configs_and_split_credentials_moves_them_out():
    config = {"a": ["http://u:pw@h"], "b": {"c": ("mysql://x:y@z",)}, "d": 3}
    assert redact(config) == {"a": ["http://u:***@h"], "b": {"c": ("mysql://x:***@z",)}, "d": 3}
    assert split_credentials("https://u:p@w@host/api") == ("https://host/api", "u", "p@w")
    assert split_credentials("https://host/api") == ("https://host/api", None, None)
