"""The `running` fixture: a real local cluster for one test module, stopped by PID afterwards,
also when the run is interrupted (SIGINT, or SIGTERM through tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import clusterkit
import pytest

from mvtcae import cluster


class RunningCluster(NamedTuple):
    spec: cluster.ClusterSpec
    env: dict[str, str]  # for `python -m mvtcae.cli cluster ...` on this cluster
    up_output: str  # stdout and stderr of `up`


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    """A local cluster started with `python -m mvtcae.cli cluster up` on free ports, torn down after
    the module; `cluster.down` runs to its end whatever interrupts the run."""
    overrides = clusterkit.cluster_overrides(tmp_path_factory.mktemp("cluster"))
    spec = clusterkit.spec_for(overrides)
    env = {**os.environ, **overrides}
    if report := os.environ.get(clusterkit.REPORT_ENV):
        Path(report).write_text(json.dumps(overrides))
    try:
        up = clusterkit.cli(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        yield RunningCluster(spec, env, up.stdout + up.stderr)
    finally:
        with clusterkit.signals_held():
            cluster.down(spec)
            for temp_dir in spec.temp_dirs:
                shutil.rmtree(temp_dir, ignore_errors=True)
