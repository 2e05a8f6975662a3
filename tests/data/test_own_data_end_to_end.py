"""Bringing your own data, exactly as docs/data-format.md tells a new user.

The doc's code blocks marked ``<!-- own-data: NAME -->`` are read from the doc and run as they
stand, in a fresh working directory: the NumPy script writing ``my_arrays.npz``, the
``mvtcae data prepare arrays`` / ``data validate`` commands, the config (the one change: fewer
epochs and a cheaper evaluation, the MLflow store and run storage named explicitly in the
directory), ``mvtcae train --config``, ``mvtcae evaluate models:/<name>@champion``, and the
Python snippet that loads the champion and calls ``encode``/``predict``. The commands are the
real CLI in subprocesses; the config is also checked to be the demo config with only the
settings the doc says it changes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "data-format.md"
DEMO = REPO / "jobs" / "configs" / "demo.yaml"
MVTCAE = Path(sys.executable).parent / "mvtcae"

BLOCK = re.compile(r"<!-- own-data: (\w+) -->\n```(\w+)\n(.*?)\n```", re.DOTALL)
STEPS = {
    "arrays": "python",
    "prepare": "bash",
    "config": "yaml",
    "train": "bash",
    "evaluate": "bash",
    "load": "python",
}
# What the doc tells the user to change in a copy of the demo config, and nothing else.
CHANGED = {
    "name",
    "data.dataset",
    "data.dir",
    "model.decoders_dist",
    "model.decoder_scale",
    "tracking.experiment_name",
    "tracking.registered_model_name",
}
# The test's only change to the doc's config: a short run and a cheap evaluation.
SHRINK = {
    "train": {"epochs": 2},
    "eval": {
        "max_samples": 100,
        "probe_train_samples": 200,
        "probe_max_iter": 200,
        "classifier_epochs": 2,
        "nll_K": 16,
        "nll_batch_size_K": 16,
        "nll_max_samples": 32,
        "projection_samples": 100,
        "grid_samples": 4,
    },
}
# Settings a user's shell may carry that would send the run elsewhere.
FOREIGN_ENV = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "MVTCAE_DATA_DIR", "MVTCAE_STORAGE_PATH")


def doc_blocks() -> dict[str, str]:
    """The doc's marked code blocks by name, each checked for its language."""
    found: dict[str, str] = {}
    for name, language, body in BLOCK.findall(DOC.read_text()):
        assert name not in found, f"{DOC.name}: two blocks marked own-data: {name}"
        assert STEPS.get(name) == language, f"{DOC.name}: block {name} is {language}"
        found[name] = body
    assert set(found) == set(STEPS), f"{DOC.name}: own-data blocks {sorted(found)}"
    return found


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; dicts of the doc's own values stay whole where
    the demo has a scalar (``model.decoder_scale``)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in CHANGED:
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def commands(block: str) -> list[list[str]]:
    """The block's command lines as argv lists (comments dropped), the venv's ``mvtcae``."""
    argvs = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            assert argv[0] == "mvtcae", f"not an mvtcae command: {line}"
            argvs.append([str(MVTCAE), *argv[1:]])
    return argvs


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run one command as a user would; its output, asserting exit status 0. Its process group
    (a local Ray included) is killed, by its id, if it outlives the timeout."""
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    shown = " ".join(shlex.quote(a) for a in [Path(argv[0]).name, *argv[1:]])
    assert proc.returncode == 0, f"{shown} exited {proc.returncode}:\n{output[-4000:]}"
    return output


def printed_metrics(output: str) -> dict[str, float]:
    """``eval/...  0.1234`` lines as printed by ``mvtcae evaluate``."""
    found = re.findall(r"^(eval/\S+)\s+(-?[\d.]+|nan|inf)\s*$", output, re.MULTILINE)
    return {key: float(value) for key, value in found}


def test_own_arrays_to_a_loaded_model_as_the_doc_says(tmp_path: Path, monkeypatch) -> None:
    blocks = doc_blocks()
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV}
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    # 1. The arrays, written by the doc's NumPy code.
    (tmp_path / "make_arrays.py").write_text(blocks["arrays"])
    subprocess.run([sys.executable, "make_arrays.py"], cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "my_arrays.npz").is_file()

    # 2. Prepare and validate.
    for argv in commands(blocks["prepare"]):
        run(argv, tmp_path, env, timeout=120)
    manifest = json.loads((tmp_path / "data" / "my-data" / "manifest.json").read_text())
    shapes = {m: tuple(spec["shape"]) for m, spec in manifest["modalities"].items()}
    assert shapes == {"photo": (1, 16, 16), "signal": (64,), "meta": (5,)}
    assert manifest["has_labels"] and manifest["num_classes"] == 4
    assert set(manifest["splits"]) == {"train", "val", "test"}
    assert manifest["splits"]["train"]["num_rows"] == 400
    assert manifest["splits"]["train"]["present_rows"]["signal"] < 400  # masks kept

    # 3. The config: the demo's, changed only where the doc says; shrunk here.
    config = yaml.safe_load(blocks["config"])
    doc_flat, demo_flat = flatten(config), flatten(yaml.safe_load(DEMO.read_text()))
    assert set(demo_flat) <= set(doc_flat), sorted(set(demo_flat) - set(doc_flat))
    differing = {k for k in doc_flat if doc_flat[k] != demo_flat.get(k, object())}
    assert differing <= CHANGED, sorted(differing - CHANGED)
    assert config["data"]["dataset"] == "custom"
    name = config["tracking"]["registered_model_name"]
    for section, values in SHRINK.items():
        config[section].update(values)
    config["tracking"]["tracking_uri"] = tracking_uri
    config["train"]["storage_path"] = str(tmp_path / "outputs" / "ray_results")
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    # 4. Train, then evaluate the registered champion.
    (train,) = commands(blocks["train"])
    trained = run(train, tmp_path, env, timeout=420)
    assert re.search(rf"registered model\s+{re.escape(name)} v1", trained), trained[-3000:]
    assert re.search(r"alias\s+champion", trained), trained[-3000:]

    (evaluate,) = commands(blocks["evaluate"])
    assert f"models:/{name}@champion" in evaluate
    evaluated = run(evaluate, tmp_path, env, timeout=300)
    metrics = printed_metrics(evaluated)
    for key in ("eval/latent_acc_mean", "eval/coherence_mean", "eval/joint_nll"):
        assert key in metrics, evaluated[-3000:]
    assert metrics["eval/latent_acc_1"] > 0.5  # chance: 0.25; the stand-in data is learnable
    assert (tmp_path / "outputs" / "evaluation" / "evaluation.json").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias(name, "champion")
    assert str(version.version) == "1"
    run_data = client.get_run(version.run_id).data
    assert run_data.params["data.dataset"] == "custom"
    assert run_data.params["data.dir"] == str(tmp_path / "data" / "my-data")
    assert run_data.tags["mvtcae.dataset.name"] == "my-data"

    # 5. Load it in Python with the doc's snippet, in this process.
    import torch

    monkeypatch.chdir(tmp_path)
    for key in FOREIGN_ENV:
        monkeypatch.delenv(key, raising=False)
    namespace: dict[str, object] = {"__name__": "own_data_doc"}
    exec(compile(blocks["load"], f"{DOC.name}[own-data: load]", "exec"), namespace)
    latent_dim = config["model"]["latent_dim"]
    assert tuple(namespace["z"].shape) == (8, latent_dim)
    generated = namespace["generated"]
    for m in ("signal", "meta"):
        assert tuple(generated[m].shape) == (8, *shapes[m])
        assert torch.isfinite(generated[m]).all()
    model = namespace["model"]  # the downloaded files, loaded with MVTCAE.load
    assert list(model.modalities) == list(shapes)
    assert {m: tuple(d) for m, d in model.model_config.input_dims.items()} == shapes
    with torch.no_grad():
        again = (
            model.eval()
            .encode(namespace["batch"], cond_mod=["photo", "signal"], return_mean=True)
            .z
        )
    torch.testing.assert_close(again, namespace["z"])
