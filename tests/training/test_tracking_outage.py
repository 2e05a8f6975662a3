"""A tracking outage during training: the real ``mlflow server`` is stopped after the first epoch
is logged and started again seconds later. Training keeps going, the metrics of the epochs that
ended during the outage are delivered once the server is back, and the run finishes and
registers its model as usual."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from mvtcae.tracking import client_for
from mvtcae.training import train
from testkit import MlflowServer, write_tiny_views

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.usefixtures("own_ray")]

EPOCHS = 6
# Epochs of about 2 s here (3,000 rows, batch 32): the outage spans two or three of them, and
# training outlasts it.
OUTAGE_S = 6.0


def stop_during_training(server: MlflowServer, cfg, events: dict, stop: threading.Event) -> None:
    """Once an epoch of the run is logged, stop the server for OUTAGE_S seconds, then start it."""
    try:
        client = client_for(cfg.tracking)
        while not stop.wait(0.2):
            experiment = client.get_experiment_by_name(cfg.tracking.experiment_name)
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                break
        else:
            return
        server.stop()
        events["down"] = time.time()
        time.sleep(OUTAGE_S)
        server.start()
        events["up"] = time.time()
    except Exception as err:  # surfaced by the test
        events["error"] = err


def test_training_keeps_going_through_a_tracking_outage(tmp_path: Path, make_config):
    dataset = write_tiny_views(
        tmp_path / "ds", n_train=3000, n_test=150, classes=4, width=12, name="outage-views"
    )
    with MlflowServer(tmp_path / "server") as server:
        cfg = make_config(
            tmp_path,
            dataset,
            f"tracking.tracking_uri={server.uri}",
            f"train.epochs={EPOCHS}",
            "train.batch_size=32",
            "eval.coherence=false",
            "eval.plots=false",
        )
        events: dict = {}
        stop = threading.Event()
        watcher = threading.Thread(target=stop_during_training, args=(server, cfg, events, stop))
        watcher.start()
        try:
            result = train(cfg)
        finally:
            stop.set()
            watcher.join()
        assert "error" not in events, events
        assert "down" in events and "up" in events, "the server was never stopped"

        client = client_for(cfg.tracking)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/loss", "perf/epoch_time_s"):
            steps = sorted(m.step for m in client.get_metric_history(result.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
        # Epochs that ended while the server was down (their values carry the time they were
        # taken) reached MLflow afterwards.
        during = [
            m.step
            for m in client.get_metric_history(result.run_id, "train/loss")
            if events["down"] * 1000 <= m.timestamp <= events["up"] * 1000
        ]
        assert during, "no epoch ended during the outage: lengthen the epochs or the outage"
        assert result.registered is not None and result.registered.promoted
        assert not list(Path(result.run_dir).glob("unsent_tracking/*.json"))  # all delivered
