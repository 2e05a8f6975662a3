"""The console filter and the run log files (`mvtcae.storage.console`), without Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mvtcae.storage import console


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(console.VERBOSE_ENV, "0")


def test_third_party_info_leaves_the_console_unless_verbose(
    tmp_path: Path, quiet: None, monkeypatch: pytest.MonkeyPatch
):
    logger = logging.getLogger("mlflow.system_metrics.test")
    parent = logging.getLogger("mlflow")
    with open(tmp_path / "console.txt", "w") as stream:
        handler = logging.StreamHandler(stream)
        monkeypatch.setattr(parent, "handlers", [handler])
        monkeypatch.setattr(parent, "propagate", False)
        monkeypatch.setattr(parent, "level", parent.level)
        parent.setLevel(logging.INFO)
        console.quiet_console(("mlflow",))
        console.quiet_console(("mlflow",))  # once per handler
        assert sum(isinstance(f, console.ConsoleFilter) for f in handler.filters) == 1
        logger.info("Started monitoring system metrics.")
        logger.warning("a warning stays")
        monkeypatch.setenv(console.VERBOSE_ENV, "1")
        logger.info("verbose shows INFO")
    lines = (tmp_path / "console.txt").read_text().splitlines()
    assert lines == ["a warning stays", "verbose shows INFO"]


@pytest.mark.parametrize("uri", [False, True], ids=["local", "file-uri"])
def test_run_log_takes_each_record_once_and_appends_across_processes(
    tmp_path: Path, quiet: None, uri: bool, monkeypatch: pytest.MonkeyPatch
):
    for name in ("ray", "mvtcae"):  # INFO, as Ray and the command set them
        logger = logging.getLogger(name)
        monkeypatch.setattr(logger, "level", logger.level)  # restored after the test
        logger.setLevel(logging.INFO)  # (clears the loggers' level caches)
    run_dir = tmp_path / "run"
    location = f"file://{run_dir}" if uri else str(run_dir)
    for attempt in (1, 2):  # a restarted worker goes on in the same file
        with console.RunLog(location, "rank0") as log:
            logging.getLogger("ray.train.v2._internal.execution.storage").info(
                "Checkpoint successfully created at: %d", attempt
            )
            logging.getLogger("mvtcae.training.loop").info("epoch %d/2", attempt)
            logging.getLogger("ray.train").debug("not kept")
        assert log.handler not in logging.getLogger().handlers  # detached
    text = (run_dir / console.LOG_DIR / "rank0.log").read_text()
    assert text.count("Checkpoint successfully created at: 1") == 1
    assert text.count("Checkpoint successfully created at: 2") == 1
    assert text.count("epoch 1/2") == 1 and text.count("epoch 2/2") == 1
    assert "not kept" not in text
