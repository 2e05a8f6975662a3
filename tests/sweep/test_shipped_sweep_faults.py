"""The shipped sweeps (``jobs/configs/tune_*.yaml``), shrunk only in trials, epochs and rows,
through a fault: the sweep driver is SIGKILLed once a trial is complete, then ``--resume`` ends
the sweep. Nothing of the killed driver is left, the study ends with every trial finished and
none left running, every trial's MLflow run holds each of its epochs once, and the best trial's
model is registered.
"""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from faultkit import CONFIGS, EVAL_SHRINK, MVTCAE, Command, mlflow_client, ray_temp_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

TRIALS = 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The commands' working directory: mfeat is prepared at its default location once."""
    return tmp_path_factory.mktemp("shipped-sweeps")


def _states(optuna_db: Path) -> dict[str, int]:
    """Trials by state, read from the study's SQLite file read-only (never racing the sweep)."""
    if not optuna_db.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"file:{optuna_db}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT state, COUNT(*) FROM trials GROUP BY state").fetchall()
    except sqlite3.Error:  # the schema is not there yet
        return {}
    return dict(rows)


@pytest.mark.parametrize(
    "config, epochs",
    # tune_mfeat.yaml trains the trials of tune_mfeat_pareto.yaml (see the test below); its
    # one-objective search is tune_demo.yaml's kind.
    [("tune_demo.yaml", 3), ("tune_mfeat_pareto.yaml", 3)],
    ids=["tune_demo", "tune_mfeat_pareto"],
)
def test_a_killed_sweep_driver_resumes_to_the_end(
    workdir: Path, tmp_path: Path, config: str, epochs: int
) -> None:
    optuna_db, mlflow_uri = tmp_path / "optuna.db", f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [
        f"tune.num_samples={TRIALS}",
        f"train.epochs={epochs}",
        *EVAL_SHRINK,
        f"tune.storage=sqlite:///{optuna_db}",
        f"train.storage_path={tmp_path / 'runs'}",
        f"tracking.tracking_uri={mlflow_uri}",
    ]
    argv = [*MVTCAE, "tune", "--config", str(CONFIGS / config)]
    argv += [word for s in sets for word in ("--set", s)]
    with ray_temp_dir() as ray_tmp:
        commands: list[Command] = []
        try:
            commands.append(first := Command(argv, workdir, tmp_path / "1.log", ray_tmp))
            deadline = time.monotonic() + 600
            while _states(optuna_db).get("COMPLETE", 0) < 1:
                assert first.proc.poll() is None, first.output()
                assert time.monotonic() < deadline, first.output()
                time.sleep(0.1)
            first.signal(signal.SIGKILL)
            first.wait(60)
            assert first.leftovers(settle_s=10.0) == [], (
                "a killed sweep driver's processes lived on"
            )

            commands.append(
                second := Command([*argv, "--resume"], workdir, tmp_path / "2.log", ray_tmp)
            )
            assert second.wait(900) == 0, second.output()
            assert second.leftovers() == []
        finally:
            for command in commands:
                command.kill_all()

    states = _states(optuna_db)
    assert states.get("COMPLETE", 0) >= TRIALS and states.get("RUNNING", 0) == 0, states
    client = mlflow_client(mlflow_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    assert len(children) >= TRIALS
    names = [c.info.run_name for c in children]
    assert len(names) == len(set(names)), f"a resumed trial opened a second run: {sorted(names)}"
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        # Every epoch the trial ran, once and in order, across the interruption (ASHA may have
        # stopped it early; a trial killed before its first epoch has none).
        assert sorted(steps) == list(range(1, len(steps) + 1)), (child.info.run_name, steps)
        assert child.info.status != "RUNNING", child.info.run_name
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) >= TRIALS - 1  # ASHA stops at most the others early
    assert client.search_model_versions(f"run_id = '{parents[0].info.run_id}'") or any(
        client.search_model_versions(f"run_id = '{c.info.run_id}'") for c in children
    ), "the best trial's model was not registered"


def test_tune_mfeat_trains_its_trials_as_the_drilled_pareto_sweep() -> None:
    """tune_mfeat.yaml is drilled by proxy: the experiment its trials run (the base config with
    its overrides, names aside) is tune_mfeat_pareto.yaml's; they differ in the search space and
    the objectives only."""
    from mvtcae.config import load_sweep_config

    def trials(name: str) -> dict:
        spec = load_sweep_config(CONFIGS / name)
        cfg = spec.experiment.to_dict()
        return {k: cfg[k] for k in ("data", "model", "train", "eval")}

    assert trials("tune_mfeat.yaml") == trials("tune_mfeat_pareto.yaml")
