"""End to end on a real local cluster: `python -m mvtcae.cli cluster up` (what `make cluster-up`
runs) starts a Ray head, two worker nodes and an MLflow server; the job API refuses requests
without the token and MLflow refuses them without the credentials; a tiny training job submitted
with `ray job submit --working-dir .` succeeds and its run and registered model version are
visible through the MLflow server; the MLflow password shows up in no output, log or job
record; an elastic job survives a worker node SIGKILLed under it and grows back when the node
returns; `down` stops every process by PID.

One cluster per module (start-up is the fixed cost; the `running` fixture is in conftest.py);
the last test tears it down and checks that nothing is left, and the fixture tears down again in
case a test failed first.
"""

from __future__ import annotations

import json
import os
import stat
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from clusterkit import cli as _cli

from faultkit import checkpoint_position
from mvtcae import cluster
from mvtcae.storage.processes import proc_stat
from mvtcae.tracking import auth as mlflow_auth

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOB_TIMEOUT_S = 300
EXPERIMENT = "cluster-submit-test"
REGISTERED_MODEL = "cluster-submit-tiny"


@contextmanager
def _mlflow_login(spec: cluster.ClusterSpec) -> Iterator[None]:
    """This process logs into the cluster's MLflow server as a client would: the credentials
    file's path in the environment, applied by `apply_credentials_file`; undone afterwards."""
    path = str(spec.mlflow_credentials_path)
    with mock.patch.dict(os.environ, {mlflow_auth.CREDENTIALS_FILE_ENV: path}):
        os.environ.pop(mlflow_auth.USERNAME_ENV, None)
        os.environ.pop(mlflow_auth.PASSWORD_ENV, None)
        mlflow_auth.apply_credentials_file()
        yield


def _leaks(secret: str, texts: dict[str, str]) -> list[str]:
    """Names of the texts that contain ``secret`` (an assertion on them never prints it)."""
    return [name for name, text in texts.items() if secret in text]


def _files_text(*directories: Path) -> dict[str, str]:
    return {
        str(path): path.read_text(errors="replace")
        for directory in directories
        for path in directory.rglob("*")
        if path.is_file() and not path.is_symlink()
    }


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


def test_three_nodes_and_mlflow_serve_on_loopback_only(running):
    """`up` with MVTCAE_CLUSTER_WORKER_NODES=2: a head and two nodes, each a `ray start` of its
    own with its own temp dir, and the MLflow server."""
    spec, env, _ = running
    status = _cli(env, "status")
    assert status.returncode == 0, status.stderr
    assert "Ray nodes alive: 3 of 3 started" in status.stdout
    assert f"password in {spec.mlflow_credentials_path}" in status.stdout
    assert cluster.alive_nodes(spec, cluster.read_token(spec)) == 3
    for temp_dir in spec.temp_dirs:
        assert (temp_dir / "session_latest").exists(), temp_dir
    assert cluster.http_get(f"{spec.mlflow_uri}/health")[0] == 200
    for port in (spec.dashboard_port, spec.mlflow_port):
        assert _listening_addresses(port) == {"127.0.0.1"}, port


def test_job_api_refuses_requests_without_the_token(running):
    spec, _, _ = running
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


def test_mlflow_refuses_requests_without_the_credentials(running):
    spec, env, _ = running
    for path in (
        spec.mlflow_credentials_path,
        spec.mlflow_auth_config_path,
        spec.mlflow_server_env_path,
    ):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    url = cluster.mlflow_experiments_url(spec)
    assert cluster.http_get(url)[0] == 401
    assert cluster.http_get(url, basic_auth=("admin", "not-the-password"))[0] == 401
    # What a client gets from `mvtcae.cluster env`: the file's path, from which it logs in.
    exports = _cli(env, "env").stdout
    assert f"export MVTCAE_MLFLOW_CREDENTIALS_FILE={spec.mlflow_credentials_path}" in exports
    with _mlflow_login(spec):
        username = os.environ[mlflow_auth.USERNAME_ENV]
        password = os.environ[mlflow_auth.PASSWORD_ENV]
        assert cluster.http_get(url, basic_auth=(username, password))[0] == 200
        from mlflow import MlflowClient

        assert MlflowClient(tracking_uri=spec.mlflow_uri).search_experiments() is not None
    assert mlflow_auth.USERNAME_ENV not in os.environ
    # Processes the cluster starts and jobs get the path, never the password.
    assert "MLFLOW_TRACKING_PASSWORD" not in cluster.client_env(spec)
    assert "MLFLOW_TRACKING_PASSWORD" not in cluster.runtime_env(spec)["env_vars"]


def _write_tiny_dataset(directory: Path, n_train: int = 400) -> None:
    """Three 12-d views of a 4-class latent, written with the platform's own writer."""
    from mvtcae.data import write_arrays

    rng = np.random.default_rng(1)
    mixing = [rng.normal(scale=0.7, size=(4, 12)) for _ in range(3)]

    def split(n: int) -> dict:
        labels = rng.integers(0, 4, n)
        z = rng.normal(size=(n, 4)) + 2.0 * np.eye(4)[labels]
        views = {f"v{i}": np.tanh(z @ w).astype(np.float32) for i, w in enumerate(mixing)}
        return {"data": views, "labels": labels}

    write_arrays(directory, {"train": split(n_train), "test": split(100)}, num_classes=4)


def _training_entrypoint(storage: Path, *extra: str) -> list[str]:
    """The real training job and demo config, shrunk to seconds (paths on shared storage);
    ``extra`` overrides come last."""
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
    for item in [*overrides, *extra]:
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


# About a second each: the two-worker stretch must outlast a node's return (~40 s), and the
# preemption after it its deadline and restart.
EPOCHS = 48
DRAIN_DEADLINE_S = 10  # Ray's watcher sees a drain up to 5 s late


def _newest_checkpoint_state(run_root: Path) -> dict | None:
    """The trainer state of the newest complete checkpoint of any run under ``run_root``."""
    done = sorted(
        run_root.glob("*/checkpoint_epoch_*/checksums.json"),
        key=lambda p: checkpoint_position(p.parent.name),
    )
    for checksums in reversed(done):
        try:  # Ray uploads an epoch's checkpoint file by file, its checksums maybe first
            return json.loads((checksums.parent / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
    return None


def _wait_for_state(run_root: Path, done, spec, submission_id: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = _newest_checkpoint_state(run_root)
        if state and done(state):
            return state, time.monotonic()
        status, body = cluster.http_get(
            f"{spec.dashboard_url}/api/jobs/{submission_id}", token=cluster.read_token(spec)
        )
        if status == 200 and json.loads(body)["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(f"the job ended before the drill's step: {body[-2000:]!r}")
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint as the drill needs after {timeout_s} s: {state}")


def _node_holding_a_training_worker(spec) -> dict:
    """The record of a worker node (not the head) with a Ray Train worker in its process tree."""
    from mvtcae.storage.processes import descendants

    for record in json.loads(spec.state_file.read_text())["processes"]:
        if not record["name"].startswith("ray-node"):
            continue
        for pid in descendants(record["pid"]):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    return record
            except OSError:
                continue
    raise AssertionError("no worker node holds a training worker")


def test_a_submitted_elastic_job_survives_a_lost_node_tracked_through_the_server(running):
    """The training job through `ray job submit --working-dir .`, and the node-loss drill: the
    cluster has a head and two worker nodes of 2 CPUs; the job asks train.num_workers [1, 3] of
    2 CPUs each, so it starts on all three nodes. After epoch 2 `mvtcae cluster kill-node`
    SIGKILLs the worker node that holds a training worker (its `ray start`, raylet and workers,
    by PID, no notice); the run goes on with two workers from its newest checkpoint;
    `mvtcae cluster start-node` brings the node back and the run grows back to three. Then a
    preemption: `mvtcae cluster drain-node` tells Ray that a node with a training worker is
    drained with 10 s left and kills it at the deadline; the workers checkpoint on the notice
    (a tag says so), Ray counts the restart as a preemption, and the run ends on two workers.
    One MLflow run, each epoch once with the world size it ran on, a tag per resize, the
    model evaluated and registered, every request authenticated, and the password nowhere."""
    from mlflow import MlflowClient

    spec, env, up_output = running
    _write_tiny_dataset(spec.storage_dir / "data" / "tiny", n_train=2400)
    run_root = spec.storage_dir / "ray_results"
    entrypoint = _training_entrypoint(
        spec.storage_dir,
        f"train.epochs={EPOCHS}",
        "train.num_workers=[1, 3]",
        "train.resources_per_worker={CPU: 2}",
        "train.threads_per_worker=1",
        "train.elastic_resize_check_s=2",
        "train.worker_start_timeout_s=10",
        "train.max_failures=3",
        "train.checkpoint.every_steps=8",
    )
    submission_id = f"train-{uuid.uuid4().hex[:8]}"
    server_log = spec.log_dir / "mlflow.log"
    logged_before = len(server_log.read_bytes())
    submitted = _cli(
        env, "submit", "--no-wait", "--submission-id", submission_id, "--", *entrypoint
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "--working-dir=." in submitted.stdout

    # The drill.
    three_after_two = lambda state: state["epoch"] >= 2 and state["world_size"] == 3  # noqa: E731
    _wait_for_state(run_root, three_after_two, spec, submission_id)
    node = _node_holding_a_training_worker(spec)["name"].removeprefix("ray-node")
    print(_cli(env, "status").stdout)  # the closing note of issue 24 quotes it
    killed = _cli(env, "kill-node", node)
    assert killed.returncode == 0, killed.stdout + killed.stderr
    killed_at = time.monotonic()
    status = _cli(env, "status").stdout
    assert f"ray-node{node}" in status and "(exited)" in status, status
    state, shrunk_at = _wait_for_state(
        run_root, lambda s: s["world_size"] == 2, spec, submission_id
    )
    # The node comes back: the same `ray start`, recorded in place of the dead one.
    started = _cli(env, "start-node", node)
    assert started.returncode == 0, started.stdout + started.stderr
    back_at = time.monotonic()
    _, grown_at = _wait_for_state(
        run_root,
        lambda s: s["world_size"] == 3 and s["epoch"] > state["epoch"],
        spec,
        submission_id,
    )
    # A preemption: a node with a training worker is drained with a deadline, then killed.
    grown = _newest_checkpoint_state(run_root)
    node = _node_holding_a_training_worker(spec)["name"].removeprefix("ray-node")
    drained_at = time.monotonic()
    drained = _cli(env, "drain-node", node, "--deadline-s", str(DRAIN_DEADLINE_S))
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert "killed at the deadline" in drained.stdout, drained.stdout
    _, preempted_at = _wait_for_state(
        run_root,
        lambda s: s["world_size"] == 2 and s["epoch"] > grown["epoch"],
        spec,
        submission_id,
    )
    print(
        f"drill: lost node -> training on 2 workers in {shrunk_at - killed_at:.0f} s; "
        f"node back -> 3 workers in {grown_at - back_at:.0f} s; "
        f"drained ({DRAIN_DEADLINE_S} s) -> 2 workers in {preempted_at - drained_at:.0f} s"
    )

    info = _wait_for_job(spec, submission_id)
    logs = cluster.http_get(
        f"{spec.dashboard_url}/api/jobs/{submission_id}/logs", token=cluster.read_token(spec)
    )[1].decode()
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-6000:]}"
    assert "MVTCAE training summary" in logs
    # Every request of the job's driver and workers carried the credentials (the workers got
    # them from the runtime env's setup hook): the server refused none while the job ran.
    requests = server_log.read_bytes()[logged_before:].decode(errors="replace").splitlines()
    assert [line for line in requests if '" 401 ' in line] == []
    assert any('/runs/log-batch HTTP/1.1" 200' in line for line in requests), requests[-20:]
    # Workers reach this cluster's state API, not whichever Ray they would find on the host.
    assert "Found multiple active Ray instances" not in logs
    # Train V2's patched print would tee each worker line twice; the epoch line comes once.
    assert logs.count(f"[mvtcae] epoch 1/{EPOCHS} ") == 1, logs[-6000:]

    with _mlflow_login(spec):
        client = MlflowClient(tracking_uri=spec.mlflow_uri, registry_uri=spec.mlflow_uri)
        experiment = client.get_experiment_by_name(EXPERIMENT)
        assert experiment is not None
        (run,) = client.search_runs([experiment.experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["train.epochs"] == str(EPOCHS)
        assert "val/loss" in run.data.metrics and "eval/joint_nll" in run.data.metrics
        for key in ("train/loss", "val/loss", "train/world_size"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
        history = client.get_metric_history(run.info.run_id, "train/world_size")
        sizes = [int(m.value) for m in sorted(history, key=lambda m: m.step)]
        changes = [n for i, n in enumerate(sizes) if i == 0 or sizes[i - 1] != n]
        assert changes == [3, 2, 3, 2], sizes
        resizes = sorted(v for k, v in run.data.tags.items() if k.startswith("mvtcae.resize."))
        assert resizes == ["2 -> 3 workers", "3 -> 2 workers", "3 -> 2 workers"], resizes
        # The workers heard the notice and checkpointed on it, inside an epoch.
        notices = {k: v for k, v in run.data.tags.items() if k.startswith("mvtcae.preemption.")}
        assert len(notices) == 1, notices
        ((tag, note),) = notices.items()
        assert "_step_" in tag and "drained for preemption" in note, notices
        (version,) = client.search_model_versions(f"name='{REGISTERED_MODEL}'")
        assert version.run_id == run.info.run_id and version.status == "READY"
        champion = client.get_model_version_by_alias(REGISTERED_MODEL, "champion")
        assert champion.version == version.version
    # Artifacts went through the server into its store, checkpoints into the shared storage.
    assert any((spec.mlflow_dir / "artifacts").rglob("MLmodel"))
    assert any(run_root.rglob(f"checkpoint_epoch_{EPOCHS:04d}"))

    # Ray Train charged the drained node to the preemption budget, not to max_failures: its
    # controller's decisions, in its log on the head.
    decisions = [
        json.loads(line)["message"]
        for log in spec.head_temp_dir.glob("session_latest/logs/train/ray-train-sys-controller-*")
        for line in log.read_text().splitlines()
        if "[FailurePolicy]" in line
    ]
    sources = [m.split("Source: ")[1].split("\n")[0] for m in decisions]
    assert "preemption" in sources, decisions

    # The password is in none of what the cluster and the job showed or wrote down.
    _, password = cluster.mlflow_credentials(spec)
    job_record = cluster.http_get(
        f"{spec.dashboard_url}/api/jobs/{submission_id}", token=cluster.read_token(spec)
    )[1].decode()
    texts = {
        "`up` output": up_output,
        "`env` output": _cli(env, "env").stdout,
        "`status` output": _cli(env, "status").stdout,
        "`submit` output": submitted.stdout + submitted.stderr,
        "job logs": logs,
        "job record (runtime env)": job_record,
        **_files_text(spec.log_dir, *spec.temp_dirs),
    }
    runtime_env = json.loads(job_record)["runtime_env"]
    assert runtime_env["env_vars"]["MVTCAE_MLFLOW_CREDENTIALS_FILE"] == str(
        spec.mlflow_credentials_path
    )
    assert runtime_env["worker_process_setup_hook"] == "mvtcae.tracking.auth.apply_credentials_file"
    assert _leaks(password, texts) == []


def test_down_stops_every_process_it_started(running):
    spec, env, _ = running
    recorded = [p["pid"] for p in json.loads(spec.state_file.read_text())["processes"]]
    assert len(recorded) == 4  # MLflow and three Ray nodes (one of them restarted by the drill)
    down = _cli(env, "down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert all(proc_stat(pid) is None for pid in recorded)
    assert cluster.strays(spec) == []
    assert not spec.state_file.exists()
    assert cluster.http_get(f"{spec.dashboard_url}/api/version")[0] == 0
    assert cluster.http_get(f"{spec.mlflow_uri}/health")[0] == 0
