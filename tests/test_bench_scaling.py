"""The scaling benchmark's arithmetic (jobs/bench_scaling.py, docs/scaling.md) against
independent computations: a simulated ring all-reduce, a simulated prefetching loader, and the
platform's own model for the parameter count."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scaling", REPO / "jobs/bench_scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def simulated_ring_all_reduce(n: int, values: int) -> tuple[int, np.ndarray]:
    """Reduce-scatter then all-gather around a ring of ``n`` workers holding ``values`` numbers
    each; returns the numbers worker 0 sent and worker 0's result."""
    rng = np.random.default_rng(n)
    data = [rng.normal(size=values) for _ in range(n)]
    chunks = [np.array_split(d.copy(), n) for d in data]
    sent = 0
    for step in range(n - 1):  # reduce-scatter: chunk (rank - step) moves to rank + 1
        outgoing = [chunks[r][(r - step) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r - step) % n] += outgoing[r]
        sent += outgoing[0].size
    for step in range(n - 1):  # all-gather: the reduced chunk (rank + 1 - step) moves on
        outgoing = [chunks[r][(r + 1 - step) % n].copy() for r in range(n)]
        for r in range(n):
            chunks[(r + 1) % n][(r + 1 - step) % n] = outgoing[r]
        sent += outgoing[0].size
    result = np.concatenate(chunks[0])
    np.testing.assert_allclose(result, np.sum(data, axis=0))  # the simulation is an all-reduce
    return sent, result


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_bytes_match_a_simulated_ring_all_reduce(bench, n: int) -> None:
    values = 8 * n * 5  # divisible by n: every chunk the same size
    sent, _ = simulated_ring_all_reduce(n, values)
    assert bench.ring_bytes_per_gpu(4.0 * values, n) == pytest.approx(4.0 * sent)
    assert bench.ring_bytes_per_gpu(4.0 * values, 1) == 0.0


def simulated_wait_fraction(rate_rows_s: float, batch: int, step_s: float, steps: int) -> float:
    """Data wait / wall time of a loader producing ``rate_rows_s`` rows/s ahead of a consumer
    that takes ``batch`` rows every ``step_s`` seconds of compute (unbounded prefetch)."""
    produce_s = batch / rate_rows_s
    ready = clock = wait = 0.0
    for _ in range(steps):
        ready += produce_s  # batch k is ready when the loader has produced it
        if ready > clock:
            wait += ready - clock
            clock = ready
        clock += step_s
    return wait / clock


def test_the_prefetching_data_rate_keeps_the_wait_at_five_percent(bench) -> None:
    inputs = bench.ModelInputs(
        config="x",
        batch_per_gpu=64,
        grad_bytes=1e6,
        row_bytes=100,
        flops_per_sample=1e9,
        ops_per_step=1000,
        gpu_flops=1e14,
        launch_s=8e-6,
        alpha_s=1e-5,
        bucket_bytes=25 * 2**20,
    )
    step_s, batch = 0.01, 64
    need = bench.data_rate_needed(inputs, step_s, batch)
    rate = need["pipelined_rows_per_s"]
    assert simulated_wait_fraction(rate, batch, step_s, 20000) == pytest.approx(0.05, abs=2e-3)
    assert simulated_wait_fraction(rate * 1.02, batch, step_s, 20000) < 0.05
    # Not overlapped: load b rows at R, then compute; the wait share b/R / (t + b/R) is 5%.
    blocking = need["blocking_rows_per_s"]
    assert (batch / blocking) / (step_s + batch / blocking) == pytest.approx(0.05)
    assert need["pipelined_bytes_per_s"] == pytest.approx(rate * 100)


def test_predicted_samples_per_s_follow_the_step_times(bench) -> None:
    inputs = bench.ModelInputs(
        config="x",
        batch_per_gpu=64,
        grad_bytes=64e6,
        row_bytes=100,
        flops_per_sample=1e9,
        ops_per_step=1000,
        gpu_flops=1e14,
        launch_s=8e-6,
        alpha_s=1e-5,
        bucket_bytes=25 * 2**20,
    )
    p = bench.predict(inputs, 8, 100.0, 64)
    compute = max(64 * 1e9 / 1e14, 1000 * 8e-6)
    comm = 2 * 7 / 8 * 64e6 / (100e9 / 8) + 1e-5 * 2 * 7 * math.ceil(64e6 / (25 * 2**20))
    assert p["t_compute_ms"] == pytest.approx(1e3 * compute)
    assert p["t_comm_ms"] == pytest.approx(1e3 * comm)
    assert p["samples_per_s_no_overlap"] == pytest.approx(8 * 64 / (compute + comm))
    assert p["samples_per_s_full_overlap"] == pytest.approx(8 * 64 / max(compute, comm))
    assert bench.predict(inputs, 1, 100.0, 64)["efficiency_no_overlap"] == pytest.approx(1.0)


def test_the_demo_volume_row_counts_the_trained_models_parameters(bench) -> None:
    from mvtcae import MVTCAE
    from mvtcae.config import load_config
    from mvtcae.training import model_config_for

    runs = {r.label: r for r in bench.shipped_runs()}
    row = bench.volume_row(runs["demo.yaml"], flop_batch=4)
    cfg = load_config(REPO / "jobs/configs/demo.yaml")
    manifest, _ = bench.manifest_for(cfg)
    trained = MVTCAE(model_config_for(cfg.model, manifest))  # what the Train workers build
    params = sum(p.numel() for p in trained.parameters())
    assert row["params"] == params and row["grad_bytes_fp32"] == 4 * params
    assert row["ring_bytes_per_gpu_at_config_workers"] == 4 * params  # 2 workers: 2·1/2·G
