"""The model library stands alone: `pip install mvtcae-platform` (no extras) brings torch,
safetensors and numpy only, and a checkpoint written by a training run loads and runs with
nothing else importable. The licence file matches what pyproject.toml declares."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import torch

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig
from mvtcae.config import TrainSection
from mvtcae.storage.checkpoints import TrainerState, capture_rng_state, save_checkpoint
from mvtcae.training import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[2]
CORE = {"torch", "safetensors", "numpy"}
# What the platform extra brings; none of it may be needed to load and run a model.
PLATFORM_ONLY = [
    "ray",
    "mlflow",
    "optuna",
    "optuna_dashboard",
    "pyarrow",
    "pydantic",
    "yaml",
    "click",
    "tqdm",
    "sklearn",
    "skimage",
    "matplotlib",
    "mlxtend",
    "pandas",
]

# Runs in a fresh interpreter in which importing any of PLATFORM_ONLY fails, as it would where
# only the core dependencies are installed.
LOADER = """
import importlib.abc, json, sys
BLOCKED = set(sys.argv[1].split(","))

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
import numpy as np, torch
from mvtcae import MVTCAE, MultimodalBatch
model = MVTCAE.load(sys.argv[2]).eval()
inputs = np.load(sys.argv[3])
batch = MultimodalBatch(data={m: torch.from_numpy(inputs[m]) for m in inputs.files})
with torch.no_grad():
    z = model.encode(batch, cond_mod=["a"], return_mean=True).z
    b = model.predict(batch, cond_mod=["a"], gen_mod="b", return_mean=True)["b"]
np.savez(sys.argv[4], z=z.numpy(), b=b.numpy())
print(json.dumps(sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)))
"""


def _dependency_names(requirements: list[str]) -> set[str]:
    return {r.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip() for r in requirements}


def test_the_package_without_extras_needs_torch_safetensors_and_numpy_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert _dependency_names(project["dependencies"]) == CORE
    extras = project["optional-dependencies"]
    assert {"ray", "mlflow", "optuna", "pyarrow"} <= _dependency_names(extras["platform"])
    assert "optuna-dashboard" in _dependency_names(extras["dashboards"])
    makefile = (ROOT / "Makefile").read_text()
    assert ".[platform,dashboards,data,dev]" in makefile  # make install keeps installing all


def test_a_training_checkpoint_loads_and_runs_without_the_platform(tmp_path: Path):
    torch.manual_seed(0)
    cfg = MVTCAEConfig(n_modalities=2, latent_dim=3, input_dims={"a": (4,), "b": (6,)})
    model = MVTCAE(cfg)
    train = TrainSection()
    optimizer = build_optimizer(model.parameters(), train)
    checkpoint = tmp_path / "checkpoint_epoch_0001"
    save_checkpoint(
        checkpoint,
        model,
        optimizer,
        build_scheduler(optimizer, train),
        TrainerState(epoch=1, metrics={"val/loss": 1.0}),
        [capture_rng_state()],
    )
    inputs = {
        "a": np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32),
        "b": np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32),
    }
    np.savez(tmp_path / "inputs.npz", **inputs)

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(LOADER),
            ",".join(PLATFORM_ONLY),
            str(checkpoint),
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "outputs.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []  # nothing of the platform
    got = np.load(tmp_path / "outputs.npz")
    batch = MultimodalBatch(data={m: torch.from_numpy(v) for m, v in inputs.items()})
    model.eval()
    with torch.no_grad():
        z = model.encode(batch, cond_mod=["a"], return_mean=True).z
        b = model.predict(batch, cond_mod=["a"], gen_mod="b", return_mean=True)["b"]
    np.testing.assert_array_equal(got["z"], z.numpy())
    np.testing.assert_array_equal(got["b"], b.numpy())


def test_the_command_names_the_missing_extra_where_only_the_model_is_installed():
    code = (
        textwrap.dedent(LOADER.split("import numpy as np, torch")[0])
        + "from mvtcae.cli import main\nmain()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, ",".join(PLATFORM_ONLY)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "pip install 'mvtcae-platform[platform]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_the_licence_file_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"]
    assert declared == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
