"""The fault paths on the configs users run: ``jobs/configs/*.yaml``, shrunk only in epochs and
rows (never in optimizer, precision, workers or model options), through real ``mvtcae train``
processes.

For each fault: the run ends as it should (KILLED with one line that says how to resume, or
nothing at all after a SIGKILL), no process of it is left, the resumed run is the same MLflow
run, its metric steps run 1..E exactly once, it never resumes behind a checkpoint that exists,
and its losses equal an uninterrupted run's (the data order of an epoch is a function of
(seed, rank, epoch), and checkpoints carry every generator's state).
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from faultkit import (
    CONFIGS,
    EVAL_SHRINK,
    MVTCAE,
    Command,
    checkpoint_position,
    mlflow_client,
    newest_intact_epoch,
    newest_intact_position,
    ray_temp_dir,
    wait_for_checkpoint,
)
from mvtcae.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

LOSS_KEYS = ("train/loss", "val/loss", "train/grad_norm", "lr")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working directory of every command here: the built-in datasets are prepared at their
    default location under it once, and the evaluation's classifiers are cached there."""
    return tmp_path_factory.mktemp("shipped")


class Store:
    """One MLflow SQLite store and run storage: where a series of commands keeps its run."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.runs = root, root / "runs"
        self.uri = f"sqlite:///{root / 'mlflow.db'}"

    def argv(self, config: str, epochs: int, *extra: str, command: str = "train") -> list[str]:
        # The config's own settings, then the shrink (epochs and rows) and this store.
        sets = [
            *extra,
            f"train.epochs={epochs}",
            *EVAL_SHRINK,
            f"train.storage_path={self.runs}",
            f"tracking.tracking_uri={self.uri}",
        ]
        return [*MVTCAE, command, "--config", str(CONFIGS / config)] + [
            word for s in sets for word in ("--set", s)
        ]

    def only_run(self) -> object:
        client = mlflow_client(self.uri)
        runs = [
            r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
        ]
        assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
        return runs[0]

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return sorted(
            (m.step, m.value) for m in mlflow_client(self.uri).get_metric_history(run_id, key)
        )


def run(argv: list[str], workdir: Path, log: Path, ray_tmp: Path) -> Command:
    return Command(argv, workdir, log, ray_tmp)


def finish(command: Command, timeout: float = 900) -> None:
    code = command.wait(timeout)
    assert code == 0, command.output()
    assert command.leftovers() == [], "processes of the run are left"


# What an uninterrupted reference run leaves out: it only supplies the losses, which the final
# evaluation and the registry do not touch.
REFERENCE_ONLY = [
    "eval.latent_accuracy=false",
    "eval.coherence=false",
    "eval.joint_nll=false",
    "eval.plots=false",
    "tracking.log_model=false",
]


def reference_run(config: str, epochs: int, extra: list[str], root: Path, workdir: Path) -> Store:
    """An uninterrupted run of ``config``: the losses the faulted runs must repeat."""
    store = Store(root)
    argv = store.argv(config, epochs, *extra, *REFERENCE_ONLY)
    with ray_temp_dir() as ray_tmp:
        command = run(argv, workdir, root / "straight.log", ray_tmp)
        try:
            finish(command)
        finally:
            command.kill_all()
    return store


def check_continuity(
    store: Store, reference: Store | None, epochs: int, resumed_after: list[int]
) -> None:
    """One FINISHED MLflow run whose every epoch is logged once (and equals the reference's, when
    there is one), that resumed after exactly the newest checkpoints that existed when it was
    stopped."""
    got = store.only_run()
    assert got.info.status == "FINISHED", got.data.tags.get("mvtcae.error")
    assert "mvtcae.error" not in got.data.tags  # the interruption is not left as its error
    for key in LOSS_KEYS:
        history = store.history(got.info.run_id, key)
        assert [s for s, _ in history] == list(range(1, epochs + 1)), (key, history)
        if reference is None:
            continue
        expected = reference.history(reference.only_run().info.run_id, key)
        assert [s for s, _ in expected] == list(range(1, epochs + 1)), (key, expected)
        for (step, have), (_, value) in zip(history, expected, strict=True):
            assert math.isclose(have, value, rel_tol=1e-6, abs_tol=1e-9), (key, step, have, value)
    restored = [v for _, v in store.history(got.info.run_id, "train/resumed_after_epoch")]
    assert sorted(int(v) for v in restored) == sorted(resumed_after)
    assert "eval/joint_nll" in got.data.metrics
    client = mlflow_client(store.uri)
    versions = client.search_model_versions(f"run_id = '{got.info.run_id}'")
    assert len(versions) == 1, versions  # the finished run registered its model once


def interrupt(command: Command, sig: int) -> None:
    """SIGINT as a terminal sends it (to the process group), SIGTERM to the command: it ends
    with the shell's status for the signal, one line saying how to resume, and nothing left."""
    command.signal(sig, group=sig == signal.SIGINT)
    code = command.wait(120)
    assert code == 128 + sig, command.output()
    last = command.last_line()
    assert last.startswith(f"mvtcae: interrupted ({signal.Signals(sig).name})"), last
    assert "is KILLED" in last and last.endswith("--resume"), last
    assert command.leftovers() == []


def sigkill_driver(command: Command, run_dir: Path) -> None:
    """SIGKILL the driver: its local Ray and training workers are gone within seconds, and no
    checkpoint is written after it died."""
    command.signal(signal.SIGKILL)
    command.wait(60)
    started = time.monotonic()
    assert command.leftovers(settle_s=10.0) == [], "a killed driver's processes lived on"
    stopped_within = time.monotonic() - started
    written = newest_intact_position(run_dir)
    time.sleep(2.0)
    assert newest_intact_position(run_dir) == written, "checkpoints after the driver died"
    assert stopped_within < 10.0


@pytest.fixture(scope="module")
def demo_reference(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    return reference_run("demo.yaml", DEMO_EPOCHS, [], tmp_path_factory.mktemp("demo-ref"), workdir)


DEMO_EPOCHS = 10


def corrupt_newest(run_dir: Path) -> tuple[str, int]:
    """Truncate the newest checkpoint's weights as an interrupted upload would: its name, and the
    epochs done at the one a resume must fall back to (the newest before it)."""
    intact = sorted(
        (checkpoint_position(p.parent.name), p.parent) for p in run_dir.glob("*/checksums.json")
    )
    assert len(intact) >= 2, intact
    (_, checkpoint), ((fallback, _), _) = intact[-1], intact[-2]
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert fallback >= 1
    return checkpoint.name, fallback


# On top of demo.yaml in the gauntlet: a checkpoint every 4 of an epoch's 13 steps, so that a
# fault lands inside an epoch and the run resumes there (the reference run has none: they
# change no number).
INSIDE_EPOCHS = ["train.checkpoint.every_steps=4"]


def test_the_demo_config_survives_every_fault_in_turn(
    workdir: Path, tmp_path: Path, demo_reference: Store
) -> None:
    """demo.yaml (mfeat, 2 workers, fp32, fused Adam, model logging), one run through every
    fault in turn, each followed by ``--resume``: the driver SIGKILLed; Ctrl-C, after which the
    newest checkpoint is found truncated (the resume falls back to the one before and says so in
    a tag); SIGTERM (``kill``, ``ray job stop``), resumed with --verbose; a training worker
    SIGKILLed (Ray Train restarts the worker group). It checkpoints every 4 steps as well
    (`INSIDE_EPOCHS`), and the driver is killed inside epoch 2: the resume goes on from that
    step. Every epoch equals the uninterrupted run's."""
    store, resumed_after = Store(tmp_path / "store"), []
    argv = store.argv("demo.yaml", DEMO_EPOCHS, *INSIDE_EPOCHS)
    with ray_temp_dir() as ray_tmp:
        commands: list[Command] = []

        def resume(n: int, *extra: str) -> Command:
            log = tmp_path / f"{n}.log"
            commands.append(command := run([*argv, "--resume", *extra], workdir, log, ray_tmp))
            return command

        try:
            commands.append(first := run(argv, workdir, tmp_path / "1.log", ray_tmp))
            run_dir = wait_for_checkpoint(store.runs, 2, first, step=4)
            sigkill_driver(first, run_dir)
            inside = newest_intact_position(run_dir)
            assert inside[0] == 1 and inside[1] >= 4, inside  # killed inside epoch 2
            resumed_after.append(inside[0])

            second = resume(2)
            wait_for_checkpoint(store.runs, resumed_after[-1] + 2, second)
            interrupt(second, signal.SIGINT)
            assert store.only_run().info.status == "KILLED"
            corrupt, fallback = corrupt_newest(run_dir)
            resumed_after.append(fallback)

            third = resume(3)
            wait_for_checkpoint(store.runs, fallback + 2, third)
            interrupt(third, signal.SIGTERM)
            assert store.only_run().info.status == "KILLED"
            skipped = store.only_run().data.tags["mvtcae.corrupt_checkpoints_skipped"]
            assert corrupt in skipped and "model.safetensors" in skipped, skipped
            resumed_after.append(newest_intact_epoch(run_dir))

            fourth = resume(4, "--verbose")
            wait_for_checkpoint(store.runs, resumed_after[-1] + 1, fourth)
            workers = fourth.train_workers()
            assert len(workers) == 2, workers
            resumed_after.append(newest_intact_epoch(run_dir))  # what Ray Train restores
            os.kill(workers[-1], signal.SIGKILL)
            finish(fourth)
        finally:
            for command in commands:
                command.kill_all()
    check_continuity(store, demo_reference, DEMO_EPOCHS, resumed_after)
    said = (tmp_path / "2.log").read_text(errors="replace")
    assert f"resumes epoch 2 at step {inside[1]} from " in said, said[-3000:]
    # --verbose: Ray Train's INFO lines reach the console too (they are quiet without it).
    verbose = (tmp_path / "4.log").read_text(errors="replace")
    assert RAY_REPORT_LINE in verbose and RAY_CHECKPOINT_LINE in verbose, verbose[-3000:]
    assert RAY_REPORT_LINE not in (tmp_path / "3.log").read_text(errors="replace")


# Ray Train's INFO lines: one per report (every rank, every epoch) and one per checkpoint.
RAY_REPORT_LINE, RAY_CHECKPOINT_LINE = (
    "Reporting training result",
    "Checkpoint successfully created",
)


def test_the_demo_console_has_the_platform_lines_and_the_run_log_keeps_rays(
    demo_reference: Store,
) -> None:
    """The console of an uninterrupted `mvtcae train` of demo.yaml: a header, one line per epoch
    and the summary, none of Ray Train's per-report or per-checkpoint lines and none of MLflow's
    system-metrics INFO lines; those are in the run's log files, in run storage and in the MLflow
    run (``logs/``). (With --verbose they reach the console: the SIGTERM test's resumed run.)"""
    console = (demo_reference.root / "straight.log").read_text(errors="replace")
    assert RAY_REPORT_LINE not in console and RAY_CHECKPOINT_LINE not in console, console[-3000:]
    assert "system_metrics_monitor" not in console, console[-3000:]
    for epoch in range(1, DEMO_EPOCHS + 1):
        assert f"[mvtcae] epoch {epoch}/{DEMO_EPOCHS} " in console, console[-3000:]
    assert "MLflow run " in console and "MVTCAE training summary" in console
    run = demo_reference.only_run()
    (run_dir,) = [p for p in demo_reference.runs.iterdir() if p.name.startswith("mvtcae-demo")]
    logs = {p.name: p.read_text() for p in (run_dir / "logs").iterdir()}
    assert set(logs) == {"driver.log", "rank0.log", "rank1.log"}, sorted(logs)
    assert logs["rank0.log"].count(RAY_CHECKPOINT_LINE) == DEMO_EPOCHS, logs["rank0.log"][-2000:]
    for rank in ("rank0.log", "rank1.log"):
        assert logs[rank].count(RAY_REPORT_LINE) == DEMO_EPOCHS, logs[rank][-2000:]
    client = mlflow_client(demo_reference.uri)
    logged = sorted(a.path for a in client.list_artifacts(run.info.run_id, "logs"))
    assert logged == ["logs/driver.log", "logs/rank0.log", "logs/rank1.log"], logged
    copy = client.download_artifacts(run.info.run_id, "logs/rank0.log", str(demo_reference.root))
    assert Path(copy).read_text().count(RAY_CHECKPOINT_LINE) == DEMO_EPOCHS


def _training_sections(config: str, *overrides: str) -> dict:
    """What decides a run's losses: data, model and train sections (storage and names aside)."""
    cfg = load_config(CONFIGS / config, list(overrides)).to_dict()
    cfg["train"].pop("storage_path")
    cfg["train"].pop("run_name")
    return {k: cfg[k] for k in ("data", "model", "train")}


def test_the_mfeat_config_trains_as_the_drilled_demo_config() -> None:
    """mfeat.yaml is drilled by proxy: its data, model and training sections are demo.yaml's
    (names and evaluation aside), so the demo run's faults are its faults."""
    assert _training_sections("mfeat.yaml") == _training_sections("demo.yaml")


def _reproduce_cpu_overrides(experiment: str) -> list[str]:
    """The overrides jobs/configs/reproduce_cpu.yaml applies to one of its experiments: how the
    GPU config runs on a CPU machine (one 2-CPU worker, no GPU)."""
    spec = yaml.safe_load((CONFIGS / "reproduce_cpu.yaml").read_text())
    return list(spec["experiments"][experiment]["overrides"])


POLYMNIST_ROWS = ["data.n_train=256", "data.n_test=128"]


def test_the_paper_polymnist_config_resumes_exactly_after_ctrl_c(
    workdir: Path, tmp_path: Path
) -> None:
    """The paper's PolyMNIST config as reproduce_cpu.yaml runs it on a CPU (conv networks,
    latent 512, bf16), Ctrl-C in its first epochs, then --resume: its losses equal an
    uninterrupted run's. Its data.dir override names the 20k-row dataset: the rows are shrunk,
    so the dataset is the one at its default location for those rows. (demo_polymnist.yaml, the
    MLP demo, has no fault drill of its own: its driver SIGKILL and 2-worker fp32 resume are
    demo.yaml's, drilled above.)"""
    config, epochs = "polymnist.yaml", 2  # a bf16 conv epoch is long enough to stop the second
    extra = [o for o in _reproduce_cpu_overrides("polymnist") if not o.startswith("data.")]
    extra += POLYMNIST_ROWS
    reference = reference_run(config, epochs, extra, tmp_path / "ref", workdir)
    store = Store(tmp_path / "store")
    argv = store.argv(config, epochs, *extra)
    with ray_temp_dir() as ray_tmp:
        commands: list[Command] = []
        try:
            commands.append(first := run(argv, workdir, tmp_path / "1.log", ray_tmp))
            run_dir = wait_for_checkpoint(store.runs, 1, first)
            interrupt(first, signal.SIGINT)
            resumed_after = [newest_intact_epoch(run_dir)]
            commands.append(
                second := run([*argv, "--resume"], workdir, tmp_path / "2.log", ray_tmp)
            )
            finish(second)
        finally:
            for command in commands:
                command.kill_all()
    check_continuity(store, reference, epochs, resumed_after)
