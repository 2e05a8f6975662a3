"""Builders and fixtures shared by the test packages (on sys.path via pytest's `pythonpath`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _views_split(rng: np.random.Generator, n: int, mixing: list[np.ndarray]) -> dict:
    """Views of one latent whose mean depends on the class label (latent dim = classes)."""
    classes, width = mixing[0].shape
    labels = rng.integers(0, classes, n)
    z = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[labels]
    data = {
        f"v{i}": (np.tanh(z @ w) + 0.1 * rng.normal(size=(n, width))).astype(np.float32)
        for i, w in enumerate(mixing)
    }
    return {"data": data, "labels": labels}


def write_tiny_views(
    directory: Path | str,
    *,
    n_train: int,
    n_test: int,
    classes: int,
    width: int,
    name: str,
    n_views: int = 3,
) -> Path | str:
    """Write a tiny labelled multi-view dataset with the platform's own writer (to a directory
    or an object-store URI); return where."""
    from mvtcae.data import write_arrays

    rng = np.random.default_rng(0)
    mixing = [rng.normal(scale=0.7, size=(classes, width)) for _ in range(n_views)]
    splits = {
        "train": _views_split(rng, n_train, mixing),
        "test": _views_split(rng, n_test, mixing),
    }
    write_arrays(directory, splits, name=name, num_classes=classes)
    return directory


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads: tiny models on a shared 2-core box only lose to
    thread contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def s3_server(log_dir: Path) -> Iterator[str]:
    """A local S3-compatible server (moto) on 127.0.0.1; yields its endpoint URL.

    It is a real HTTP server in its own process, stopped by its PID on exit.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with open(log_dir / "moto.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"moto server exited ({proc.returncode}); see {log_dir}/moto.log"
                )
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"moto server on {endpoint} did not answer") from None
                time.sleep(0.2)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def s3_environment(endpoint: str) -> Iterator[None]:
    """Point every AWS client in this process (and processes it starts) at ``endpoint``, with
    throwaway credentials, as a deployment's environment would; restore the old values after."""
    import os

    values = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create an S3 bucket on the server at ``endpoint``."""
    import pyarrow.fs as pafs

    host = endpoint.split("://", 1)[1]
    fs = pafs.S3FileSystem(
        endpoint_override=host,
        scheme="http",
        allow_bucket_creation=True,
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
    )
    fs.create_dir(bucket)


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 with a SQLite store under ``root``.

    ``start``/``stop`` can be called repeatedly (same port, same store) to simulate an outage;
    the process is stopped by its PID.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout_s: float = 90) -> MlflowServer:
        import os
        import subprocess
        import sys
        import time
        import urllib.request

        bin_dir = Path(sys.executable).parent
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        log = open(self.root / "mlflow-server.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                str(bin_dir / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--backend-store-uri",
                f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.root / "artifacts"),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.root / 'mlflow-server.log'}")
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"mlflow server on {self.uri} did not answer") from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server's whole process group (uvicorn workers included), by PID."""
        import contextlib
        import os
        import signal
        import subprocess

        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # members that outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port_block(worker_nodes: int = 2) -> int:
    """The first port block (see `mvtcae.cluster.ClusterSpec`) from 17600 on where nothing
    listens: room for a local Ray cluster of a head and ``worker_nodes`` nodes."""
    from mvtcae import cluster

    for base in range(17600, 30000, 500):
        ports = cluster.ClusterSpec(
            Path("/x"), Path("/h"), Path("/n"), base, base + 8, base + 9, worker_nodes=worker_nodes
        )
        if not cluster.busy_ports(ports.all_ports()):
            return base
    raise RuntimeError("no free block of 500 ports between 17600 and 30000")
