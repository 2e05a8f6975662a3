"""Concurrent registrations against a real ``mlflow server``: whatever the interleaving,
``@champion`` ends on the best version by the promotion metric.

Each round registers several versions at once from threads (real HTTP requests to one server);
a barrier releases every promotion decision together, which is the interleaving in which a gate
that reads "the champion" once and then writes can leave the worse model as champion.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path

import mlflow
import pytest

from mvtcae.config import TrackingSection
from mvtcae.tracking import client_for, log_pyfunc_model, promote_if_better
from testkit import MlflowServer

pytestmark = pytest.mark.slow

REGISTRANTS = 6
ROUNDS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running


def _register_versions(cfg: TrackingSection, info, run_id: str, n: int) -> list[int]:
    client = client_for(cfg)
    versions = []
    for _ in range(n):
        mv = client.create_model_version(
            cfg.registered_model_name, info.model_uri, run_id=run_id, model_id=info.model_id
        )
        versions.append(int(mv.version))
    return versions


def _register(cfg, version, value, run_id, barrier, errors) -> None:
    """One registrant: wait for the others, then run the promotion gate."""
    try:
        barrier.wait()
        promote_if_better(cfg, version, value, run_id=run_id)
    except BaseException as err:  # surfaced by the test
        errors.append(err)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_champion_converges_on_the_best_of_concurrent_registrations(server, make_model, mode):
    cfg = TrackingSection(
        tracking_uri=server.uri,
        experiment_name=f"concurrent-{mode}",
        registered_model_name=f"concurrent-{mode}",
        promotion_metric="eval/joint_nll",
        promotion_mode=mode,
    )
    client = client_for(cfg)
    client.create_registered_model(cfg.registered_model_name)
    mlflow.set_tracking_uri(server.uri)
    experiment = client.create_experiment(cfg.experiment_name)
    run_id = client.create_run(experiment).info.run_id
    info = log_pyfunc_model(make_model(0), run_id=run_id)
    rng = random.Random(mode)
    seen: dict[int, float] = {}
    for round_ in range(ROUNDS):
        versions = _register_versions(cfg, info, run_id, REGISTRANTS)
        values = [rng.uniform(1.0, 100.0) for _ in versions]
        if round_ == 1:
            values[0] = float("nan")  # a diverged model takes part and must never win
        barrier = threading.Barrier(len(versions))
        errors: list[BaseException] = []

        threads = [
            threading.Thread(target=_register, args=(cfg, v, x, run_id, barrier, errors))
            for v, x in zip(versions, values, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not errors, errors
        seen.update(zip(versions, values, strict=True))
        finite = {v: x for v, x in seen.items() if x == x}
        pick = min if mode == "min" else max
        best = pick(finite, key=lambda v: (finite[v], v) if mode == "min" else (finite[v], -v))
        champion = int(
            client.get_model_version_by_alias(cfg.registered_model_name, "champion").version
        )
        assert champion == best, (
            f"round {round_}: champion v{champion} ({seen[champion]}) but the best is "
            f"v{best} ({finite[best]})"
        )


def test_mlflow_server_helper_is_really_a_server(server, tmp_path: Path):
    import urllib.request

    with urllib.request.urlopen(f"{server.uri}/health", timeout=5) as response:
        assert response.status == 200
