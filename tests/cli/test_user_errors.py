"""A user's mistake ends an ``mvtcae`` command with one line, ``mvtcae: error: <message>``, on
stderr and exit status 1, without a traceback (``--verbose`` adds it); a config error keeps
click's usage message and exit status 2. The message names the file, field, path or modality at
fault, and what can be refused before the dataset or Ray is touched is refused there.

Every test runs the real command in a subprocess (``python -m mvtcae.cli``), in a tmp working
directory with an MLflow SQLite store and run storage under it, over tiny datasets written by
the platform's own writer.

``MVTCAE_TEST_PLATFORM=<dir>`` runs the commands on another checkout's ``platform`` folder (put
first on the subprocess's PYTHONPATH), e.g. an older commit's worktree, to see which of these
cases it got wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testkit import write_tiny_views

REPO = Path(__file__).resolve().parents[2]
PLATFORM_ENV = "MVTCAE_TEST_PLATFORM"
"""Another ``platform`` folder to run the commands on (first on their PYTHONPATH)."""
_UNSET = ("RAY_ADDRESS", "MVTCAE_DATA_DIR", "MVTCAE_STORAGE_PATH", "MLFLOW_TRACKING_URI")
"""The user's environment settings that would change what a command does (cluster, defaults)."""
RAY_STARTED = ("Started a local Ray instance", "Ray dashboard")
"""What the output holds once the command started a local Ray."""
BEFORE_RAY_S = 20.0
"""A command refused before Ray starts ends within this (its imports take ~5 s here)."""
FAST_TIMEOUT_S = 90
"""Hard limit of a command that should fail before Ray: it is stopped (and the test fails)
after this, whatever it was doing (an old version trained the demo instead)."""
RAY_TIMEOUT_S = 240
"""Hard limit of a command that starts Ray."""
ONE_SHORT_EPOCH = (
    "train.epochs=1",
    "train.num_workers=1",
    "train.batch_size=32",
    "model.latent_dim=8",
)


@dataclass
class Outcome:
    """How one command ended."""

    args: list[str]
    status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def last_line(self) -> str:
        """The last non-empty line on stderr (where the command's own error line goes)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def __str__(self) -> str:
        return (
            f"$ mvtcae {' '.join(self.args)}\nexit {self.status} after {self.seconds:.1f} s\n"
            f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n--- stderr (tail) ---\n"
            f"{self.stderr[-6000:]}"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _UNSET}
    # Not Ray's default 8265, which the Ray tests running beside these take: a dashboard that
    # loses the port to them fails, Ray prints its traceback and waits a minute.
    env["MVTCAE_DASHBOARD_PORT"] = str(_free_port())
    other = os.environ.get(PLATFORM_ENV)
    if other:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (other, env.get("PYTHONPATH")) if p)
    return env


def _stop_tree(proc: subprocess.Popen) -> None:
    """Stop a command that ran past its limit, and every process it started, by PID."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for p in [proc, *tree]:
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            os.kill(p.pid, signal.SIGKILL)
    proc.communicate()


def mvtcae(cwd: Path, *args: str, timeout: float = FAST_TIMEOUT_S) -> Outcome:
    """Run ``mvtcae <args>`` in ``cwd``; fail the test if it runs past ``timeout``."""
    command = [sys.executable, "-m", "mvtcae.cli", *args]
    started = time.monotonic()
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_tree(proc)
        pytest.fail(f"mvtcae {' '.join(args)} still ran after {timeout} s (stopped)")
    return Outcome(list(args), proc.returncode, stdout, stderr, time.monotonic() - started)


def stores(root: Path) -> list[str]:
    """``--set`` options putting MLflow's store, its artifacts and the run storage under
    ``root``."""
    return sets(
        f"tracking.tracking_uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'mlartifacts'}",
        f"train.storage_path={root / 'ray_results'}",
    )


def sets(*overrides: str) -> list[str]:
    return [word for override in overrides for word in ("--set", override)]


def custom(dataset: Path) -> list[str]:
    return sets("data.dataset=custom", f"data.dir={dataset}")


def assert_user_error(result: Outcome, *names: str, before_ray: bool = False) -> None:
    """One line ``mvtcae: error: ...`` last on stderr naming each of ``names``, exit 1, no
    traceback; ``before_ray``: within seconds, and no Ray was started."""
    assert "Traceback" not in result.output, str(result)
    assert result.last_line.startswith("mvtcae: error: "), str(result)
    for name in names:
        assert name in result.last_line, f"{name!r} not in the error line\n{result}"
    assert result.status == 1, str(result)
    if before_ray:
        assert_before_ray(result)


def assert_usage_error(result: Outcome, *names: str) -> None:
    """Click's usage message (``Error: ...``, last) naming each of ``names``, exit 2."""
    assert "Traceback" not in result.output, str(result)
    assert "Error:" in result.last_line, str(result)
    for name in names:
        assert name in result.last_line, f"{name!r} not in the error line\n{result}"
    assert result.status == 2, str(result)


def assert_before_ray(result: Outcome) -> None:
    for line in RAY_STARTED:
        assert line not in result.output, f"Ray was started\n{result}"
    assert result.seconds < BEFORE_RAY_S, f"took {result.seconds:.1f} s\n{result}"


def no_run_started(root: Path) -> bool:
    """Nothing was written to the run storage of `stores`."""
    return not (root / "ray_results").exists()


# --------------------------------------------------------------------------------------------
# Datasets and a model (written once per module)
# --------------------------------------------------------------------------------------------
def _tiny(directory: Path, *, width: int = 12, n_views: int = 3) -> Path:
    write_tiny_views(
        directory,
        n_train=64,
        n_test=32,
        classes=4,
        width=width,
        name="tiny-views",
        n_views=n_views,
    )
    return directory


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user-error-data")


@pytest.fixture(scope="module")
def views(data_root: Path) -> Path:
    """Three 12-wide views v0, v1, v2 (64 train / 32 test rows)."""
    return _tiny(data_root / "views")


@pytest.fixture(scope="module")
def narrow_views(data_root: Path) -> Path:
    """The same names as `views`, 8 wide: another dataset."""
    return _tiny(data_root / "narrow-views", width=8)


@pytest.fixture(scope="module")
def two_views(data_root: Path) -> Path:
    """Only v0 and v1, 12 wide."""
    return _tiny(data_root / "two-views", n_views=2)


@pytest.fixture(scope="module")
def model_dir(data_root: Path) -> Path:
    """A saved MVTCAE over v0, v1, v2 of width 12."""
    from mvtcae import MVTCAE, MVTCAEConfig

    config = MVTCAEConfig(
        n_modalities=3, latent_dim=4, input_dims={m: (12,) for m in ("v0", "v1", "v2")}
    )
    directory = data_root / "model"
    MVTCAE(config).save(directory)
    return directory


# --------------------------------------------------------------------------------------------
# mvtcae train: the dataset
# --------------------------------------------------------------------------------------------
def test_mistyped_data_dir_of_a_built_in_dataset_is_not_prepared_there(tmp_path: Path):
    """The demo's mfeat with a data.dir that holds nothing: refused before Ray, naming the
    path and data.prepare_if_missing; nothing is written there (nor at the default location)."""
    typo = tmp_path / "typo"
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *sets(f"data.dir={typo}"))
    assert_user_error(result, str(typo), "data.prepare_if_missing", before_ray=True)
    assert not typo.exists()
    assert not (tmp_path / "data").exists()
    assert no_run_started(tmp_path)


def test_custom_dataset_missing_points_at_data_prepare_arrays(tmp_path: Path):
    """data.dataset: custom over a missing directory: the path and `mvtcae data prepare
    arrays`, and no advice to prepare it on its own (a custom dataset cannot be)."""
    missing = tmp_path / "missing"
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *custom(missing))
    assert_user_error(result, str(missing), "mvtcae data prepare arrays", before_ray=True)
    assert "prepare_if_missing" not in result.last_line, str(result)
    assert not missing.exists()
    assert no_run_started(tmp_path)


def test_custom_dataset_under_a_built_in_name_is_refused(tmp_path: Path, views: Path):
    """A data.dir holding a custom dataset while data.dataset is mfeat: the run would record a
    dataset it did not train on. The message names the dataset found and `data.dataset:
    custom`."""
    result = mvtcae(
        tmp_path, "train", *stores(tmp_path), *sets("data.dataset=mfeat", f"data.dir={views}")
    )
    assert_user_error(result, str(views), "'tiny-views'", "data.dataset: custom", before_ray=True)
    assert no_run_started(tmp_path)


def test_model_options_naming_modalities_the_dataset_lacks(tmp_path: Path, views: Path):
    """model.decoders_dist naming a modality the dataset does not have: a config error naming
    the option and the modality, before Ray or an MLflow run (it came after both)."""
    result = mvtcae(
        tmp_path,
        "train",
        *stores(tmp_path),
        *custom(views),
        *sets("model.decoders_dist={zz: normal}"),
    )
    assert_usage_error(result, "model.decoders_dist", "'zz'")
    assert_before_ray(result)
    assert no_run_started(tmp_path) and not (tmp_path / "mlflow.db").exists()


def test_a_dataset_without_a_validation_split(tmp_path: Path, views: Path):
    """A dataset with only a train split: named with the splits training needs, before Ray."""
    only_train = tmp_path / "only-train"
    shutil.copytree(views, only_train)
    manifest = json.loads((only_train / "manifest.json").read_text())
    manifest["splits"] = {"train": manifest["splits"]["train"]}
    (only_train / "manifest.json").write_text(json.dumps(manifest))
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *custom(only_train))
    assert_user_error(result, str(only_train), "'train'", "'test'", before_ray=True)
    assert no_run_started(tmp_path)


@pytest.mark.slow
def test_corrupt_shard_is_named(tmp_path: Path, views: Path):
    """A shard whose bytes changed (same size): the error names the shard file. Validation runs
    once Ray is up, so this one starts Ray."""
    dataset = tmp_path / "corrupt"
    shutil.copytree(views, dataset)
    shard = dataset / "train" / "part-00000.parquet"
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 2
    raw[middle : middle + 256] = bytes(256)
    shard.write_bytes(bytes(raw))
    result = mvtcae(
        tmp_path,
        "train",
        *stores(tmp_path),
        *custom(dataset),
        *sets(*ONE_SHORT_EPOCH),
        timeout=RAY_TIMEOUT_S,
    )
    assert_user_error(result, "train/part-00000.parquet")


def test_manifest_with_a_path_traversal_shard_is_refused(tmp_path: Path, views: Path):
    """A manifest whose shard file is ``../../../etc/passwd``: refused before Ray, naming the
    manifest and the value."""
    dataset = tmp_path / "traversal"
    shutil.copytree(views, dataset)
    manifest_file = dataset / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../../../etc/passwd"
    manifest_file.write_text(json.dumps(manifest, indent=2))
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *custom(dataset))
    assert_user_error(result, str(manifest_file), "../../../etc/passwd", before_ray=True)
    assert no_run_started(tmp_path)


# --------------------------------------------------------------------------------------------
# mvtcae train --resume
# --------------------------------------------------------------------------------------------
def test_resume_with_nothing_to_resume(tmp_path: Path, views: Path):
    """--resume with no run of this name in the run storage: names train.storage_path and where
    it points, before Ray."""
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *custom(views), "--resume")
    assert_user_error(result, "train.storage_path", str(tmp_path / "ray_results"), before_ray=True)
    assert no_run_started(tmp_path)


@pytest.mark.slow
def test_resume_onto_another_dataset_is_refused(tmp_path: Path, views: Path, narrow_views: Path):
    """A real run of one short epoch, then --resume with data.dir at another dataset: refused
    before Ray, naming both datasets' digests and directories."""
    from mvtcae.data import load_manifest

    quick = sets(
        *ONE_SHORT_EPOCH,
        "tracking.log_model=false",
        "eval.latent_accuracy=false",
        "eval.coherence=false",
        "eval.joint_nll=false",
        "eval.plots=false",
        "eval.images_every_n_epochs=0",
    )
    trained = mvtcae(
        tmp_path, "train", *stores(tmp_path), *custom(views), *quick, timeout=RAY_TIMEOUT_S
    )
    assert trained.status == 0, str(trained)
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *custom(narrow_views), *quick, "--resume")
    assert_user_error(
        result,
        "--resume",
        str(views),
        load_manifest(str(views)).digest()[:12],
        str(narrow_views),
        load_manifest(str(narrow_views)).digest()[:12],
        before_ray=True,
    )


# --------------------------------------------------------------------------------------------
# mvtcae train: a run the machine cannot hold
# --------------------------------------------------------------------------------------------
def test_more_cpus_than_the_machine_has(tmp_path: Path):
    """train.num_workers=64 on the demo: refused within seconds, naming the 64 CPUs asked and
    the machine's count, before the demo dataset is prepared and before Ray."""
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *sets("train.num_workers=64"))
    have = len(os.sched_getaffinity(0))
    assert_user_error(
        result, "train.num_workers 64", "64 CPUs", f"this machine has {have}", before_ray=True
    )
    assert not (tmp_path / "data" / "mfeat").exists()
    assert no_run_started(tmp_path)


def test_gpu_config_on_a_machine_without_gpus(tmp_path: Path):
    """The shipped polymnist.yaml (4 GPU workers) here: refused, naming the 4 GPUs asked and 0
    on this machine, before its dataset is prepared and before Ray."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    config = REPO / "jobs" / "configs" / "polymnist.yaml"
    result = mvtcae(tmp_path, "train", "--config", str(config), *stores(tmp_path))
    assert_user_error(result, "4 GPUs", "this machine has 0", before_ray=True)
    assert not (tmp_path / "data").exists()
    assert no_run_started(tmp_path)


# --------------------------------------------------------------------------------------------
# mvtcae evaluate
# --------------------------------------------------------------------------------------------
def _evaluate(tmp_path: Path, model: Path, dataset: Path) -> Outcome:
    store = f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    return mvtcae(
        tmp_path,
        "evaluate",
        str(model),
        "--data",
        str(dataset),
        "--out",
        str(tmp_path / "evaluation"),
        *sets(store),
    )


def test_evaluate_on_a_dataset_without_a_model_modality(
    tmp_path: Path, model_dir: Path, two_views: Path
):
    """A model of v0, v1, v2 on a dataset of v0, v1: names the missing 'v2' and the dataset;
    nothing is written."""
    result = _evaluate(tmp_path, model_dir, two_views)
    assert_user_error(result, "'v2'", str(two_views), before_ray=True)
    assert not (tmp_path / "evaluation").exists()


def test_evaluate_on_a_dataset_of_other_shapes(tmp_path: Path, model_dir: Path, narrow_views: Path):
    """The model's modality names, 8 wide instead of 12: names the modality and both shapes."""
    result = _evaluate(tmp_path, model_dir, narrow_views)
    assert_user_error(result, str(narrow_views), "(8,)", "(12,)", before_ray=True)
    assert any(f"'{m}'" in result.last_line for m in ("v0", "v1", "v2")), str(result)
    assert not (tmp_path / "evaluation").exists()


def test_evaluate_garbage_weights(tmp_path: Path, model_dir: Path, views: Path):
    """A model directory whose model.safetensors is garbage of the same size: exit 1, naming
    the file."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])
    result = _evaluate(tmp_path, model, views)
    assert_user_error(result, str(weights), before_ray=True)


def test_evaluate_a_registered_model_that_does_not_exist(tmp_path: Path, views: Path):
    """models:/NAME@champion of a name the store does not hold: exit 1, naming the URI and
    the store (it was MLflow's 59-line traceback)."""
    result = mvtcae(
        tmp_path,
        "evaluate",
        "models:/no-such-model@champion",
        "--data",
        str(views),
        "--out",
        str(tmp_path / "eval"),
        *stores(tmp_path),
    )
    assert_user_error(result, "models:/no-such-model@champion", "mlflow.db", before_ray=True)


def test_evaluate_model_config_that_is_not_json(tmp_path: Path, model_dir: Path, views: Path):
    """A model directory whose model_config.json is not JSON: a one-line error (exit 1, or 2 as
    click's usage error) naming the file."""
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    config = model / "model_config.json"
    config.write_text("{not json")
    result = _evaluate(tmp_path, model, views)
    if result.status == 2:
        assert_usage_error(result, str(config))
    else:
        assert_user_error(result, str(config))
    assert_before_ray(result)


# --------------------------------------------------------------------------------------------
# --verbose
# --------------------------------------------------------------------------------------------
def test_verbose_adds_the_traceback_of_the_same_error(tmp_path: Path):
    """--verbose on the missing custom dataset: the traceback, then the same last line, whose
    message is the traceback's exception's."""
    missing = tmp_path / "missing"
    result = mvtcae(tmp_path, "train", *stores(tmp_path), *custom(missing), "--verbose")
    assert "Traceback (most recent call last)" in result.stderr, str(result)
    assert result.last_line.startswith("mvtcae: error: "), str(result)
    assert str(missing) in result.last_line, str(result)
    assert "mvtcae data prepare arrays" in result.last_line, str(result)
    assert result.status == 1, str(result)
    message = result.last_line.removeprefix("mvtcae: error: ")
    raised = [line for line in result.stderr.splitlines() if line.strip()][-2]
    assert raised.endswith(f": {message}"), str(result)
    assert_before_ray(result)
