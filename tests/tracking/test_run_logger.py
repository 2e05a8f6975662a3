"""RunLogger against a real ``mlflow server`` that is down, then up: nothing is lost, nothing
raises, what is pending is spooled to run storage and delivered later; bounded retries."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mvtcae.tracking.registry import RegistryDatasetMismatchError
from mvtcae.tracking.run_logger import (
    RunLogger,
    TrackingUnavailableError,
    flush_spools,
    retry_until,
)
from testkit import MlflowServer

pytestmark = pytest.mark.slow


def _new_run(uri: str) -> str:
    client = MlflowClient(tracking_uri=uri)
    return client.create_run(client.create_experiment(f"e{time.time_ns()}")).info.run_id


def test_metrics_survive_an_outage_and_a_lost_process(tmp_path: Path):
    server = MlflowServer(tmp_path / "server").start()
    try:
        run_id = _new_run(server.uri)
        spool = str(tmp_path / "run" / "unsent_tracking")
        logger = RunLogger(server.uri, run_id, spool=spool, retry_interval_s=0.5)
        logger.log_metrics({"train/loss": 3.0}, step=1)
        assert not logger.pending
        server.stop()

        started = time.monotonic()
        logger.log_metrics({"train/loss": 2.0, "val/loss": math.nan}, step=2)  # must not raise
        logger.log_metrics({"train/loss": 1.5}, step=3)
        assert time.monotonic() - started < 20  # bounded: no minutes of HTTP retries
        assert len(logger.pending.metrics) == 2 and "mvtcae.nonfinite.step_2" in logger.pending.tags
        (spooled,) = list(Path(spool).glob("*.json"))
        assert len(json.loads(spooled.read_text())["metrics"]) == 2
        assert logger.close(grace_s=1.0) == 3  # still down: kept, not dropped
        del logger  # the process "dies" here; the spool remains

        server.start()
        assert flush_spools(spool, server.uri, grace_s=30) == 0
        assert not list(Path(spool).glob("*.json"))
        client = MlflowClient(tracking_uri=server.uri)
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/loss"))
        assert history == [(1, 3.0), (2, 2.0), (3, 1.5)]
        assert client.get_run(run_id).data.tags["mvtcae.nonfinite.step_2"] == "val/loss=nan"
    finally:
        server.stop()


def test_logged_steps_reads_the_run_and_says_nothing_when_down_without_the_password(
    tmp_path: Path, caplog
):
    server = MlflowServer(tmp_path / "server").start()
    try:
        run_id = _new_run(server.uri)
        secret = "s3cr3t-steps-pw"
        uri = server.uri.replace("http://", f"http://reader:{secret}@")
        logger = RunLogger(uri, run_id)
        logger.log_metrics({"val/loss": 2.0}, step=1)
        logger.log_metrics({"val/loss": 1.0}, step=3)
        assert logger.logged_steps("val/loss") == {1, 3}
        server.stop()
        with caplog.at_level("WARNING"):
            assert logger.logged_steps("val/loss") == set()  # down: nothing taken as logged
        assert "could not read val/loss" in caplog.text
        assert secret not in caplog.text
    finally:
        server.stop()


def test_retry_until_gives_up_with_a_clear_error_after_its_grace():
    calls = []

    def down() -> None:
        calls.append(time.monotonic())
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(
        TrackingUnavailableError, match="registering: MLflow did not answer for 1 s"
    ):
        retry_until(down, "registering", grace_s=1.0, interval_s=0.2)
    assert len(calls) >= 2
    assert retry_until(lambda: 42, "anything", grace_s=1.0) == 42


def test_retry_until_raises_a_user_error_at_once():
    calls = []

    def refused() -> None:
        calls.append(1)
        raise RegistryDatasetMismatchError("registered model 'm' holds another dataset")

    started = time.monotonic()
    with pytest.raises(RegistryDatasetMismatchError, match="holds another dataset"):
        retry_until(refused, "registering", grace_s=30.0, interval_s=0.2)
    assert calls == [1] and time.monotonic() - started < 5
