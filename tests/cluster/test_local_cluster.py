"""End to end on a real local cluster: `python -m mvtcae.cluster up` (what `make cluster-up`
runs) starts a Ray head, a second Ray node and an MLflow server; the job API refuses requests
without the token; a tiny training job submitted with `ray job submit --working-dir .` succeeds
and its run and registered model version are visible through the MLflow server; `down` stops
every process by PID.

One cluster per module (start-up is the fixed cost); the last test tears it down and checks that
nothing is left, and the fixture tears down again in case a test failed first.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from mvtcae import cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 300
EXPERIMENT = "cluster-submit-test"
REGISTERED_MODEL = "cluster-submit-tiny"


def _free_port_block() -> int:
    for base in range(17600, 30000, 500):
        ports = cluster.ClusterSpec(Path("/x"), Path("/h"), Path("/n"), base, base + 8, base + 9)
        if not cluster.busy_ports(ports.all_ports()):
            return base
    raise RuntimeError("no free block of 300 ports between 17600 and 30000")


def _cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mvtcae.cluster", *args],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """(spec, CLI environment) of a running local cluster, torn down afterwards."""
    base = _free_port_block()
    short = f"/tmp/mvt-{os.getpid()}"
    overrides = {
        "MVTCAE_CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster")),
        "MVTCAE_CLUSTER_HEAD_TMP": f"{short}-h",
        "MVTCAE_CLUSTER_NODE_TMP": f"{short}-n",
        "MVTCAE_CLUSTER_PORT_BASE": str(base),
        "MVTCAE_CLUSTER_DASHBOARD_PORT": str(base + 8),
        "MVTCAE_CLUSTER_MLFLOW_PORT": str(base + 9),
    }
    env = {**os.environ, **overrides}
    with mock.patch.dict(os.environ, overrides):
        spec = cluster.default_spec()
    try:
        up = _cli(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        yield spec, env
    finally:
        cluster.down(spec)
        for temp_dir in (spec.head_temp_dir, spec.node_temp_dir):
            shutil.rmtree(temp_dir, ignore_errors=True)


def _listening_addresses(port: int) -> set[str]:
    """Local IPs of the listening TCP sockets on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                raw = bytes.fromhex(address)
                if len(raw) == 4:
                    found.add(".".join(str(b) for b in raw[::-1]))
                else:  # IPv6, 4 little-endian words; keep IPv4-mapped loopback readable
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    found.add("127.0.0.1" if words.endswith(b"\x7f\x00\x00\x01") else words.hex())
    return found


def _post(url: str, payload: dict, token: str | None = None) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_two_nodes_and_mlflow_serve_on_loopback_only(running):
    spec, env = running
    status = _cli(env, "status")
    assert status.returncode == 0, status.stderr
    assert "Ray nodes alive: 2" in status.stdout
    assert cluster.alive_nodes(spec, cluster.read_token(spec)) == 2
    assert cluster.http_get(f"{spec.mlflow_uri}/health")[0] == 200
    for port in (spec.dashboard_port, spec.mlflow_port):
        assert _listening_addresses(port) == {"127.0.0.1"}, port


def test_job_api_refuses_requests_without_the_token(running):
    spec, _ = running
    jobs = f"{spec.dashboard_url}/api/jobs/"
    token = cluster.read_token(spec)
    assert cluster.http_get(jobs)[0] == 401
    assert cluster.http_get(jobs, token="not-the-token")[0] in (401, 403)
    submission_id = f"intruder-{uuid.uuid4().hex[:8]}"
    refused = _post(jobs, {"entrypoint": "touch /tmp/pwned", "submission_id": submission_id})
    assert refused == 401
    status, body = cluster.http_get(jobs, token=token)
    assert status == 200
    assert submission_id not in {j.get("submission_id") for j in json.loads(body)}


def _write_tiny_dataset(directory: Path) -> None:
    """Three 12-d views of a 4-class latent, written with the platform's own writer."""
    from mvtcae.data import write_arrays

    rng = np.random.default_rng(1)
    mixing = [rng.normal(scale=0.7, size=(4, 12)) for _ in range(3)]

    def split(n: int) -> dict:
        labels = rng.integers(0, 4, n)
        z = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[labels]
        views = {f"v{i}": np.tanh(z @ w).astype(np.float32) for i, w in enumerate(mixing)}
        return {"data": views, "labels": labels}

    write_arrays(directory, {"train": split(400), "test": split(100)}, num_classes=4)


def _training_entrypoint(storage: Path) -> list[str]:
    """The real training job and demo config, shrunk to seconds (paths on shared storage)."""
    overrides = [
        "name=cluster-submit",
        "data.dataset=custom",
        f"data.dir={storage / 'data' / 'tiny'}",
        "data.shuffle_buffer=64",
        "model.latent_dim=8",
        "train.epochs=1",
        "train.batch_size=64",
        "train.num_workers=2",
        "train.use_gpu=false",
        f"train.storage_path={storage / 'ray_results'}",
        f"tracking.experiment_name={EXPERIMENT}",
        f"tracking.registered_model_name={REGISTERED_MODEL}",
        "eval.max_samples=100",
        "eval.probe_train_samples=100",
        "eval.probe_max_iter=100",
        "eval.classifier_epochs=1",
        f"eval.classifier_cache_dir={storage / 'classifiers'}",
        "eval.nll_K=8",
        "eval.nll_batch_size_K=8",
        "eval.nll_max_samples=16",
        "eval.projection_samples=50",
        "eval.grid_samples=2",
    ]
    argv = ["python", "jobs/train.py", "--config", "jobs/configs/demo.yaml"]
    for item in overrides:
        argv += ["--set", item]
    return argv


def _wait_for_job(spec: cluster.ClusterSpec, submission_id: str) -> dict:
    token = cluster.read_token(spec)
    url = f"{spec.dashboard_url}/api/jobs/{submission_id}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status, body = cluster.http_get(url, token=token)
        if status == 200 and (info := json.loads(body))["status"] in (
            "SUCCEEDED",
            "FAILED",
            "STOPPED",
        ):
            return info
        time.sleep(2)
    raise AssertionError(f"job {submission_id} not finished after {JOB_TIMEOUT_S}s")


def test_submitted_training_job_is_tracked_through_the_server(running):
    from mlflow import MlflowClient

    spec, env = running
    _write_tiny_dataset(spec.storage_dir / "data" / "tiny")
    submission_id = f"train-{uuid.uuid4().hex[:8]}"
    entrypoint = _training_entrypoint(spec.storage_dir)
    submitted = _cli(
        env, "submit", "--no-wait", "--submission-id", submission_id, "--", *entrypoint
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "--working-dir=." in submitted.stdout

    info = _wait_for_job(spec, submission_id)
    logs = cluster.http_get(
        f"{spec.dashboard_url}/api/jobs/{submission_id}/logs", token=cluster.read_token(spec)
    )[1].decode()
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    assert "MVTCAE training summary" in logs
    # Workers reach this cluster's state API, not whichever Ray they would find on the host.
    assert "Found multiple active Ray instances" not in logs
    # Train V2's patched print would tee each worker line twice; the epoch line comes once.
    assert logs.count("[mvtcae] epoch 1/1 ") == 1, logs[-6000:]

    client = MlflowClient(tracking_uri=spec.mlflow_uri, registry_uri=spec.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "1"
    assert "val/loss" in run.data.metrics and "eval/joint_nll" in run.data.metrics
    (version,) = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
    assert version.run_id == run.info.run_id and version.status == "READY"
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
    assert champion.version == version.version
    # Artifacts went through the server into its store, checkpoints into the shared storage.
    assert any((spec.mlflow_dir / "artifacts").rglob("MLmodel"))
    assert any((spec.storage_dir / "ray_results").rglob("checkpoint_epoch_0001"))


def test_down_stops_every_process_it_started(running):
    spec, env = running
    recorded = [p["pid"] for p in json.loads(spec.state_file.read_text())["processes"]]
    assert len(recorded) == 3
    down = _cli(env, "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(cluster._proc_stat(pid) is None for pid in recorded)
    assert cluster.strays(spec) == []
    assert not spec.state_file.exists()
    assert cluster.http_get(f"{spec.dashboard_url}/api/version")[0] == 0
    assert cluster.http_get(f"{spec.mlflow_uri}/health")[0] == 0
