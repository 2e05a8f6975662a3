"""Driver loss: ``mvtcae train`` SIGKILLed mid-epoch and resumed follows the run it continues.

Three real driver processes on one CPU worker each: an uninterrupted run, a run whose driver is
SIGKILLed in the middle of epoch 3 (its local Ray goes with it), and ``--resume`` of that run.
The resumed run restores model, optimizer, scheduler and every generator from the epoch-2
checkpoint, reads each epoch's rows in the same order, and so logs the same per-epoch losses
as the uninterrupted run, into the same MLflow run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvtcae.config import load_config
from mvtcae.tracking import client_for
from testkit import write_tiny_views

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EPOCHS = 4
KILL_IN_EPOCH = 3


@pytest.fixture(scope="module")
def long_epochs_dataset(tmp_path_factory) -> Path:
    """Enough rows that an epoch takes seconds at batch 16, so a kill lands inside one."""
    return write_tiny_views(
        tmp_path_factory.mktemp("fidelity") / "ds",
        n_train=12000, n_test=150, classes=4, width=12, name="fidelity-views",
    )  # fmt: skip


def _config_file(root: Path, dataset: Path, experiment: str, make_config) -> Path:
    cfg = make_config(
        root, dataset,
        "name=fidelity", f"train.epochs={EPOCHS}", "train.batch_size=16", "train.num_workers=1",
        "train.resources_per_worker={CPU: 1}", "train.threads_per_worker=1",
        "train.local_num_cpus=3", "train.max_failures=0", "train.checkpoint.num_to_keep=4",
        f"tracking.experiment_name={experiment}", "tracking.log_model=false",
        "eval.latent_accuracy=false", "eval.coherence=false", "eval.plots=false",
    )  # fmt: skip
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    cfg.to_yaml(path)
    return path


def _driver(config: Path, log: Path, *extra: str) -> subprocess.Popen:
    """``mvtcae train`` in its own process group (its local Ray included)."""
    mvtcae = Path(sys.executable).parent / "mvtcae"
    with open(log, "wb") as out:
        return subprocess.Popen(
            [str(mvtcae), "train", "--config", str(config), *extra],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def _stop_group(proc: subprocess.Popen) -> None:
    """Kill what is left of a driver's process group, by its id."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _wait_for_checkpoint(run_root: Path, epoch: int, proc: subprocess.Popen, log: Path) -> None:
    """Until the epoch's checkpoint is complete and registered in Ray's snapshot."""
    name = f"checkpoint_epoch_{epoch:04d}"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early:\n{log.read_text()[-3000:]}")
        done = [p for p in run_root.glob(f"*/{name}/checksums.json")]
        snapshots = [p.read_text() for p in run_root.glob("*/checkpoint_manager_snapshot.json")]
        if done and any(name in s for s in snapshots):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {name} after 400 s:\n{log.read_text()[-3000:]}")


def _losses(cfg, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = client_for(cfg.tracking)
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in ("train/loss", "val/loss", "train/recon_v0", "train/kld_v1")
    }


def _only_run_id(cfg) -> str:
    client = client_for(cfg.tracking)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
    (run,) = client.search_runs([experiment.experiment_id])
    return run.info.run_id


def test_a_resumed_run_repeats_the_uninterrupted_losses(
    tmp_path: Path, long_epochs_dataset, make_config
):
    straight_cfg = _config_file(tmp_path / "straight", long_epochs_dataset, "straight", make_config)
    killed_cfg = _config_file(tmp_path / "killed", long_epochs_dataset, "killed", make_config)
    procs: list[subprocess.Popen] = []
    try:
        straight = _driver(straight_cfg, tmp_path / "straight.log")
        procs.append(straight)
        assert straight.wait(timeout=600) == 0, (tmp_path / "straight.log").read_text()[-3000:]

        killed = _driver(killed_cfg, tmp_path / "killed.log")
        procs.append(killed)
        runs_root = tmp_path / "killed" / "ray_results"
        _wait_for_checkpoint(runs_root, KILL_IN_EPOCH - 1, killed, tmp_path / "killed.log")
        time.sleep(0.5)  # well inside the next epoch (seconds long)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=30)
        _stop_group(killed)
        assert not list(runs_root.glob(f"*/checkpoint_epoch_{KILL_IN_EPOCH:04d}"))

        resumed = _driver(killed_cfg, tmp_path / "resumed.log", "--resume")
        procs.append(resumed)
        assert resumed.wait(timeout=600) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        for proc in procs:
            _stop_group(proc)

    a, b = load_config(straight_cfg), load_config(killed_cfg)
    expected, got = _losses(a, _only_run_id(a)), _losses(b, _only_run_id(b))
    for key, history in expected.items():
        assert [s for s, _ in got[key]] == list(range(1, EPOCHS + 1)), (key, got[key])
        assert [s for s, _ in history] == list(range(1, EPOCHS + 1))
        for (step, want), (_, have) in zip(history, got[key], strict=True):
            assert have == pytest.approx(want, rel=1e-6, abs=1e-6), (key, step)
    client = client_for(b.tracking)
    run = client.get_run(_only_run_id(b))
    assert run.info.status == "FINISHED"
    # The driver started its own local Ray, so it evaluated the checkpoint itself.
    assert run.data.tags["mvtcae.eval.host"] == "driver"
    assert "eval/joint_nll" in run.data.metrics
    resumed_after = client.get_metric_history(run.info.run_id, "train/resumed_after_epoch")
    assert [(m.step, m.value) for m in resumed_after] == [(2, 2.0)]
