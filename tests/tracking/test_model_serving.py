"""The registered champion behind a real `mlflow models serve` on 127.0.0.1: encode and
cross-modal predict requests over HTTP answer what the model answers in-process, and requests
it cannot answer come back as HTTP 400 with the platform's message (naming the modality or
option at fault), not a stack trace of an unexpected error."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from mvtcae import MultimodalBatch
from mvtcae.config import TrackingSection
from mvtcae.tracking import log_model_and_register, start_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "served-over-http"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[object, str]]:
    """A tiny model registered as champion in a SQLite store, served by `mlflow models serve`."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("http")
    uri = f"sqlite:///{root}/mlflow.db"
    tracking = TrackingSection(tracking_uri=uri, registered_model_name=NAME)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    model = tiny_model(5).eval()
    with start_run(tracking):
        assert log_model_and_register(model, tracking, {"eval/joint_nll": 1.0}).alias == "champion"
    mlflow.set_tracking_uri(previous[0])
    mlflow.set_registry_uri(previous[1])

    port = _free_port()
    argv = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{NAME}@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    bin_dir = str(Path(sys.executable).parent)  # the server execs this environment's uvicorn
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", os.defpath)]),
    }
    log = open(root / "serve.log", "wb")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((root / "serve.log").read_text()[-3000:])
            time.sleep(1)
        yield model, f"{base}/invocations"
    finally:  # by PID: the server's session (its group) and what it started
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _split(arrays: dict[str, np.ndarray]) -> dict:
    columns = list(arrays)
    rows = [
        [arrays[m][i].reshape(-1).tolist() for m in columns]
        for i in range(len(next(iter(arrays.values()))))
    ]
    return {"columns": columns, "data": rows}


def _inputs(n: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "img": rng.random((n, 1, 8, 8), dtype=np.float32),
        "vec": (rng.random((n, 5)) > 0.5).astype(np.float32),
    }


def _batch(arrays: dict[str, np.ndarray]) -> MultimodalBatch:
    return MultimodalBatch(data={m: torch.from_numpy(a) for m, a in arrays.items()})


def test_encode_and_cross_modal_predict_over_http_match_the_model(served):
    model, url = served
    x = _inputs()
    status, body = _post(url, {"dataframe_split": _split(x), "params": {"task": "encode"}})
    assert status == 200, body
    want = model.encode(_batch(x), cond_mod="all", return_mean=True).z.detach().numpy()
    np.testing.assert_allclose(np.array(body["predictions"]["z"]), want, rtol=1e-5, atol=1e-6)

    status, body = _post(
        url,
        {"dataframe_split": _split({"img": x["img"]}), "params": {"gen_mod": "vec"}},
    )
    assert status == 200, body
    raw = model.predict(_batch({"img": x["img"]}), cond_mod="img", gen_mod="vec", return_mean=True)
    np.testing.assert_allclose(
        np.array(body["predictions"]["vec"]), torch.sigmoid(raw["vec"]).detach().numpy(), atol=1e-5
    )


@pytest.mark.parametrize(
    ("arrays", "params", "message"),
    [
        ({"img": np.zeros((2, 1, 8, 8))}, {"cond_mod": "audio"}, "unknown modalities ['audio']"),
        ({"img": np.zeros((2, 63))}, {}, "modality 'img': got an array of shape (2, 63)"),
        ({"img": np.zeros((2, 64))}, {"task": "decode"}, "task must be one of"),
        ({"img": np.zeros((2, 64))}, {"cond_mod": "vec"}, "no data for them"),
    ],
)
def test_bad_requests_get_400_with_the_reason(served, arrays, params, message):
    _, url = served
    status, body = _post(url, {"dataframe_split": _split(arrays), "params": params})
    assert status == 400, body
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert message in body["message"]
    assert "unexpected error" not in body["message"]
