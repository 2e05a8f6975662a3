"""Scaling on paper and on loopback: all-reduce volume, an analytic scaling model, and 1 vs 2
Ray nodes of a local cluster.

Three parts, each runnable on its own (results are merged into one JSON file):

``--part volume`` (no Ray, seconds): for every shipped config in ``jobs/configs/`` that trains a
model (experiment configs; the experiments of the reproduction protocols; the base config of
the sweeps), the model the platform builds for it: parameters, fp32 gradient bytes per step
(DDP all-reduces fp32 gradients, also under bf16 autocast, because the parameters are fp32), ring
all-reduce bytes each worker sends per step, sample bytes per step (manifest row bytes x batch),
matmul/conv FLOPs per sample of a forward and backward pass (``FlopCounterMode``) and the
number of kernel-launching operators in one training step. Shapes come from the dataset's
manifest when it is prepared locally, else from the built-in dataset's definition.

``--part model`` (no Ray, seconds): the analytic model of samples/s for N = 1..64 GPU workers
at several link bandwidths (ring all-reduce with a per-hop latency, DDP buckets, no-overlap and
full-overlap bounds) and the data-loading rate each GPU needs for data wait under 5% of step
time. GPU compute speed is an *assumption* (``--gpu-tflops``, ``--launch-us``, or a measured
``--gpu-samples-per-s``): nothing here ran on a GPU.

``--part loopback`` (real, about 3-4 minutes on 2 cores): starts a local 2-node Ray cluster
with `mvtcae.cluster.up` on free ports (stopped by PID with `mvtcae.cluster.down`, also on
Ctrl-C or an error), then measures (i) Ray Data read throughput of a prepared dataset's train
shards with the read pinned to each node in turn, then to both at once, and (ii) training
samples/s of a real `mvtcae.training` run (no MLflow) with 2 workers placed on one node
(STRICT_PACK) vs one per node (STRICT_SPREAD). Both nodes share this machine's cores, memory
bandwidth and loopback interface, so the 2-node figure is a lower bound for real hardware.

    .venv/bin/python jobs/bench_scaling.py --part volume
    .venv/bin/python jobs/bench_scaling.py --part model [--bandwidths-gbit 10,25,100,400]
    .venv/bin/python jobs/bench_scaling.py --part loopback [--train-rows 2048 --epochs 5]
    .venv/bin/python jobs/bench_scaling.py --part all

Results: a table on stdout and ``outputs/bench/bench_scaling.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from mvtcae.config import ExperimentConfig, load_config, load_sweep_config, read_yaml_mapping
from mvtcae.data import MANIFEST_FILE, Manifest, ModalitySpec, load_manifest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "jobs" / "configs"
NS = (1, 2, 4, 8, 16, 32, 64)
DDP_BUCKET_MB = 25.0
"""torch DDP's default gradient bucket size (``bucket_cap_mb``)."""
BATCH_SWEEP = (64, 256, 1024)
"""Batch sizes per GPU of the model's batch sweep at N = 64."""
DATA_WAIT = 0.05
"""The target: data wait under this fraction of step time."""

log = logging.getLogger("bench_scaling")


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("volume", "model", "loopback", "all"), default="volume")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "bench_scaling.json")
    p.add_argument("--flop-batch", type=int, default=32, help="rows of the FLOP-counting batch")
    m = p.add_argument_group("model (assumptions are labelled as such)")
    m.add_argument("--model-config", type=Path, default=CONFIGS / "polymnist.yaml")
    m.add_argument(
        "--batch-per-gpu",
        type=int,
        default=None,
        help="default: the config's global batch / its num_workers",
    )
    m.add_argument(
        "--gpu-tflops",
        type=float,
        default=150.0,
        help="ASSUMPTION: sustained bf16 TFLOP/s of one GPU on this model "
        "(~15%% of an H100 SXM's dense bf16 peak)",
    )
    m.add_argument(
        "--launch-us",
        type=float,
        default=8.0,
        help="ASSUMPTION: host time per launched operator in eager PyTorch (µs)",
    )
    m.add_argument(
        "--gpu-samples-per-s",
        type=float,
        default=None,
        help="a measured single-GPU samples/s; replaces the FLOP-based estimate",
    )
    m.add_argument(
        "--bandwidths-gbit",
        default="10,25,100,400",
        help="per-GPU link bandwidths of the slowest hop (Gbit/s)",
    )
    m.add_argument(
        "--alpha-us", type=float, default=10.0, help="ASSUMPTION: latency per ring hop (µs)"
    )
    m.add_argument(
        "--grad-value-bytes",
        type=int,
        default=4,
        choices=(2, 4),
        help="bytes per gradient value on the wire: 4 fp32 (DDP default), "
        "2 with a bf16 compression comm hook",
    )
    lb = p.add_argument_group("loopback")
    lb.add_argument("--train-rows", type=int, default=2048)
    lb.add_argument("--epochs", type=int, default=5, help="per run; the first is warm-up")
    lb.add_argument("--networks", default="mlp")
    lb.add_argument("--latent", type=int, default=512)
    lb.add_argument("--batch-size", type=int, default=256, help="global")
    lb.add_argument(
        "--read-dir",
        type=Path,
        default=REPO / "data" / "polymnist-5000",
        help="dataset whose train shards the read test streams (prepared if missing)",
    )
    lb.add_argument(
        "--read-rows", type=int, default=5000, help="train rows, when --read-dir has to be prepared"
    )
    lb.add_argument("--read-repeats", type=int, default=3)
    lb.add_argument("--read-batch", type=int, default=256)
    return p.parse_args()


def summary(values: list[float]) -> dict[str, float]:
    """Median, min, max and count of repeated measurements."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def fmt_summary(s: dict[str, float], digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"


# --- shipped configs -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ShippedRun:
    """One training run a shipped config describes."""

    label: str
    cfg: ExperimentConfig
    note: str = ""


def _protocol_runs(path: Path, raw: dict[str, Any]) -> list[ShippedRun]:
    """The experiments of a reproduction protocol (``experiments: {key: {config, overrides}}``)."""
    return [
        ShippedRun(
            f"{path.name}:{key}",
            load_config(CONFIGS / e["config"], e.get("overrides", [])),
            f"{e['config']} + overrides",
        )
        for key, e in raw["experiments"].items()
    ]


def _sweep_run(path: Path) -> ShippedRun:
    spec = load_sweep_config(path)
    searched = ", ".join(sorted(spec.tune.space))
    return ShippedRun(f"{path.name} (base)", spec.experiment, f"search varies {searched}")


def shipped_runs(directory: Path = CONFIGS) -> list[ShippedRun]:
    """Every training run described by the YAML files in ``directory``."""
    out: list[ShippedRun] = []
    for path in sorted(directory.glob("*.yaml")):
        raw = read_yaml_mapping(path, "config")
        if "experiments" in raw:
            out += _protocol_runs(path, raw)
        elif "tune" in raw:
            out.append(_sweep_run(path))
        else:
            out.append(ShippedRun(path.name, load_config(path)))
    return out


# --- dataset shapes --------------------------------------------------------------------------


def builtin_manifest(dataset: str) -> Manifest:
    """The manifest a built-in dataset would have, without writing it (no splits)."""
    if dataset == "polymnist":
        from mvtcae.data.polymnist import modality_specs

        return Manifest(
            name="polymnist-recreation",
            modalities=modality_specs(),
            num_classes=10,
            has_labels=True,
            splits={},
        )
    if dataset == "mfeat":
        from mvtcae.data.sources import MFEAT_VIEWS

        modalities = {
            v: ModalitySpec(shape=(w,), dtype="float32", kind="vector")
            for v, w in MFEAT_VIEWS.items()
        }
        return Manifest(
            name="mfeat", modalities=modalities, num_classes=10, has_labels=True, splits={}
        )
    raise ValueError(f"no built-in shapes for dataset {dataset!r}: prepare it first")


def manifest_for(cfg: ExperimentConfig) -> tuple[Manifest, str]:
    """The dataset manifest of a config and where it came from (a local manifest, or the
    built-in dataset's definition when the dataset is not prepared here)."""
    directory = Path(cfg.data.resolved_dir())
    if (directory / MANIFEST_FILE).is_file():
        return load_manifest(directory), f"manifest in {directory}"
    return builtin_manifest(cfg.data.dataset), "dataset definition"


# --- part 1: volume --------------------------------------------------------------------------


def build_model(cfg: ExperimentConfig, manifest: Manifest) -> torch.nn.Module:
    """The MVTCAE the platform builds for this config and dataset."""
    from mvtcae import MVTCAE
    from mvtcae.training import model_config_for

    torch.manual_seed(0)
    return MVTCAE(model_config_for(cfg.model, manifest))


def random_batch(manifest: Manifest, rows: int) -> Any:
    """A batch of model inputs of the manifest's shapes (values do not matter for cost)."""
    from mvtcae import MultimodalBatch

    return MultimodalBatch(
        data={m: torch.rand(rows, *spec.shape) for m, spec in manifest.modalities.items()}
    )


def _is_view(func: Any) -> bool:
    """Whether an aten operator only returns a view (launches no kernel)."""
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


class OperatorCount(TorchDispatchMode):
    """Counts aten operators that compute (views excluded): a proxy for kernel launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_view(func):
            self.count += 1
        return func(*args, **(kwargs or {}))


def step_cost(cfg: ExperimentConfig, manifest: Manifest, rows: int) -> dict[str, float]:
    """FLOPs per sample of forward + backward, and operators in one training step (forward,
    backward, fused Adam step) under the config's precision."""
    from mvtcae.training import build_optimizer
    from mvtcae.training.step import autocast

    model = build_model(cfg, manifest)
    optimizer = build_optimizer(model.parameters(), cfg.train)
    batch = random_batch(manifest, rows)
    counter = FlopCounterMode(display=False)
    with counter:
        model(batch).loss.backward()
    optimizer.zero_grad(set_to_none=True)
    ops = OperatorCount()
    with ops:
        with autocast(torch.device("cpu"), cfg.train.precision):
            loss = model(batch).loss
        loss.backward()
        optimizer.step()
    return {"flops_per_sample": counter.get_total_flops() / rows, "ops_per_step": ops.count}


def ring_bytes_per_gpu(grad_bytes: float, n: int) -> float:
    """Bytes each of ``n`` workers sends (and receives) in a ring all-reduce of ``grad_bytes``."""
    return 2.0 * (n - 1) / n * grad_bytes if n > 1 else 0.0


def volume_row(run: ShippedRun, flop_batch: int) -> dict[str, Any]:
    """The all-reduce and input volume of one shipped run."""
    cfg = run.cfg
    manifest, shapes_from = manifest_for(cfg)
    model = build_model(cfg, manifest)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    grad_bytes = 4 * params
    workers = cfg.train.max_workers
    per_worker = cfg.train.batch_size / workers
    return {
        "config": run.label,
        "note": run.note,
        "shapes_from": shapes_from,
        "dataset": cfg.data.dataset,
        "networks": cfg.model.networks,
        "latent_dim": cfg.model.latent_dim,
        "precision": cfg.train.precision,
        "num_workers": workers,
        "global_batch": cfg.train.batch_size,
        "batch_per_worker": per_worker,
        "params": params,
        "grad_bytes_fp32": grad_bytes,
        "ddp_buckets": math.ceil(grad_bytes / (DDP_BUCKET_MB * 2**20)),
        "ring_bytes_per_gpu_at_config_workers": ring_bytes_per_gpu(grad_bytes, workers),
        "ring_bytes_per_gpu_at_8": ring_bytes_per_gpu(grad_bytes, 8),
        "ring_bytes_per_gpu_at_64": ring_bytes_per_gpu(grad_bytes, 64),
        "row_bytes": manifest.row_bytes,
        "sample_bytes_per_step_global": manifest.row_bytes * cfg.train.batch_size,
        "sample_bytes_per_step_per_worker": manifest.row_bytes * per_worker,
        **step_cost(cfg, manifest, flop_batch),
    }


def part_volume(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Volume rows for every shipped training run."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    rows = []
    for run in shipped_runs():
        log.info("volume: %s", run.label)
        rows.append(volume_row(run, args.flop_batch))
    return rows


# --- part 2: the scaling model ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """What the scaling model needs; the compute figures are assumptions unless measured."""

    config: str
    batch_per_gpu: int
    grad_bytes: float
    row_bytes: int
    flops_per_sample: float
    ops_per_step: int
    gpu_flops: float
    launch_s: float
    alpha_s: float
    bucket_bytes: float
    measured_samples_per_s: float | None = None

    def compute_s(self, batch: int) -> float:
        """Per-GPU compute time of one step of ``batch`` rows: a measured rate when given, else
        the slower of FLOPs / sustained FLOP/s and the host's operator-launch floor."""
        if self.measured_samples_per_s:
            return batch / self.measured_samples_per_s
        return max(
            batch * self.flops_per_sample / self.gpu_flops, self.ops_per_step * self.launch_s
        )

    def comm_s(self, n: int, bandwidth_bytes_s: float) -> float:
        """Ring all-reduce time of the gradients over ``n`` workers: bandwidth + latency terms."""
        if n == 1:
            return 0.0
        buckets = max(1, math.ceil(self.grad_bytes / self.bucket_bytes))
        latency = self.alpha_s * 2 * (n - 1) * buckets
        return ring_bytes_per_gpu(self.grad_bytes, n) / bandwidth_bytes_s + latency


def predict(inputs: ModelInputs, n: int, gbit: float, batch: int) -> dict[str, float]:
    """Predicted step time and samples/s for ``n`` workers of ``batch`` rows each on links of
    ``gbit`` Gbit/s, without and with full overlap of all-reduce and backward."""
    t_compute = inputs.compute_s(batch)
    t_comm = inputs.comm_s(n, gbit * 1e9 / 8)
    t_serial, t_overlap = t_compute + t_comm, max(t_compute, t_comm)
    single = batch / t_compute
    return {
        "n": n,
        "gbit": gbit,
        "batch_per_gpu": batch,
        "t_compute_ms": 1e3 * t_compute,
        "t_comm_ms": 1e3 * t_comm,
        "samples_per_s_no_overlap": n * batch / t_serial,
        "samples_per_s_full_overlap": n * batch / t_overlap,
        "efficiency_no_overlap": (n * batch / t_serial) / (n * single),
        "efficiency_full_overlap": (n * batch / t_overlap) / (n * single),
    }


def data_rate_needed(inputs: ModelInputs, step_s: float, batch: int) -> dict[str, float]:
    """Per-GPU loading rate for data wait < DATA_WAIT of step time, for a prefetching
    (pipelined) loader and for a loader that runs between steps (not overlapped)."""
    consume = batch / step_s
    pipelined = (1 - DATA_WAIT) * consume
    blocking = (1 - DATA_WAIT) / DATA_WAIT * consume
    return {
        "consume_rows_per_s": consume,
        "pipelined_rows_per_s": pipelined,
        "pipelined_bytes_per_s": pipelined * inputs.row_bytes,
        "blocking_rows_per_s": blocking,
        "blocking_bytes_per_s": blocking * inputs.row_bytes,
    }


def model_inputs(args: argparse.Namespace) -> ModelInputs:
    """The scaling model's inputs for ``--model-config`` (volume measured here, GPU assumed)."""
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    cfg = load_config(args.model_config)
    manifest, _ = manifest_for(cfg)
    model = build_model(cfg, manifest)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cost = step_cost(cfg, manifest, args.flop_batch)
    return ModelInputs(
        config=args.model_config.name,
        batch_per_gpu=args.batch_per_gpu or cfg.train.batch_size // cfg.train.max_workers,
        grad_bytes=args.grad_value_bytes * params,
        row_bytes=manifest.row_bytes,
        flops_per_sample=cost["flops_per_sample"],
        ops_per_step=int(cost["ops_per_step"]),
        gpu_flops=args.gpu_tflops * 1e12,
        launch_s=args.launch_us * 1e-6,
        alpha_s=args.alpha_us * 1e-6,
        bucket_bytes=DDP_BUCKET_MB * 2**20,
        measured_samples_per_s=args.gpu_samples_per_s,
    )


def part_model(args: argparse.Namespace) -> dict[str, Any]:
    """Weak scaling (fixed batch per GPU) and strong scaling (the config's global batch fixed)
    predictions for N in NS at every bandwidth, and the data-loading rates needed."""
    inputs = model_inputs(args)
    bandwidths = [float(b) for b in args.bandwidths_gbit.split(",")]
    cfg = load_config(args.model_config)
    weak = [predict(inputs, n, b, inputs.batch_per_gpu) for b in bandwidths for n in NS]
    strong = [
        predict(inputs, n, b, max(1, cfg.train.batch_size // n)) for b in bandwidths for n in NS
    ]
    for row in strong:  # against one GPU taking the whole global batch, at the same bandwidth
        one = next(r for r in strong if r["gbit"] == row["gbit"] and r["n"] == 1)
        for bound in ("no_overlap", "full_overlap"):
            row[f"speedup_{bound}"] = row[f"samples_per_s_{bound}"] / one[f"samples_per_s_{bound}"]
            del row[f"efficiency_{bound}"]  # per-GPU batch changes with N: speedup says it
    b = inputs.batch_per_gpu
    batch_sweep = [predict(inputs, NS[-1], bw, size) for bw in bandwidths for size in BATCH_SWEEP]
    return {
        "inputs": dataclasses.asdict(inputs),
        "assumed": {
            "gpu_tflops_sustained": args.gpu_tflops,
            "launch_us_per_operator": args.launch_us,
            "alpha_us_per_hop": args.alpha_us,
            "ddp_bucket_mb": DDP_BUCKET_MB,
            "grad_value_bytes": args.grad_value_bytes,
            "gpu_samples_per_s_measured": args.gpu_samples_per_s,
        },
        "single_gpu": {
            "compute_ms": 1e3 * inputs.compute_s(b),
            "flop_bound_ms": 1e3 * b * inputs.flops_per_sample / inputs.gpu_flops,
            "launch_bound_ms": 1e3 * inputs.ops_per_step * inputs.launch_s,
            "samples_per_s": b / inputs.compute_s(b),
        },
        "weak": weak,
        "strong_global_batch": cfg.train.batch_size,
        "strong": strong,
        "batch_sweep_at_64": batch_sweep,
        "data_rate_single_gpu": data_rate_needed(inputs, inputs.compute_s(b), b),
    }


# --- part 3: loopback ------------------------------------------------------------------------


def free_port_base(start: int = 21000) -> int:
    """The first block of ports (see `mvtcae.cluster.ClusterSpec`) where nothing listens."""
    from mvtcae import cluster

    for base in range(start, 40000, 500):
        probe = cluster.ClusterSpec(Path("/x"), Path("/h"), Path("/n"), base, base + 8, base + 9)
        if not cluster.busy_ports(probe.all_ports()):
            return base
    raise RuntimeError(f"no free block of ports between {start} and 40000")


def cluster_spec(state_dir: Path) -> Any:
    """A 2-node local cluster spec of this benchmark: its own state dir, free ports, short temp
    dirs (Ray's socket paths are limited), 2 logical CPUs per node."""
    from mvtcae import cluster

    base = free_port_base()
    short = f"/tmp/mvt-bs{os.getpid()}"
    return cluster.ClusterSpec(
        state_dir=state_dir,
        head_temp_dir=Path(f"{short}-h"),
        node_temp_dir=Path(f"{short}-n"),
        port_base=base,
        dashboard_port=base + 8,
        mlflow_port=base + 9,
        cpus_per_node=2,
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM while the cluster is being stopped, so that stopping completes."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def cluster_environment(spec: Any) -> Iterator[None]:
    """This process as a client of the benchmark's cluster: its token and addresses in the
    environment. Ray reads its authentication mode when first imported, so this must be entered
    before anything imports Ray."""
    import sys

    from mvtcae import cluster

    if "ray" in sys.modules:
        raise RuntimeError("Ray was imported before the cluster's environment was set")
    env = cluster.client_env(spec) | {cluster.PROJECT_DIR_ENV: str(REPO)}
    with mock.patch.dict(os.environ, env, clear=True):
        yield


@contextlib.contextmanager
def local_cluster(spec: Any) -> Iterator[dict[str, Any]]:
    """`mvtcae.cluster.up` on ``spec``, this process connected to it as a Ray driver; always
    `mvtcae.cluster.down` (by PID) afterwards, then a check that none of its processes is left.
    Enter `cluster_environment` first."""
    import ray

    from mvtcae import cluster

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    recorded: list[int] = []
    try:
        started = time.perf_counter()
        state = cluster.up(spec)
        recorded = [p["pid"] for p in state["processes"]]
        pids = ", ".join(f"{p['name']} {p['pid']}" for p in state["processes"])
        log.info("cluster up in %.1f s: %s", time.perf_counter() - started, pids)
        ray.init(address=spec.gcs_address, logging_level=logging.WARNING)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield state
    finally:
        with signals_ignored():
            with contextlib.suppress(Exception):
                ray.shutdown()
            stopped = cluster.down(spec)
            left = sorted(set(cluster.strays(spec)) | {p for p in recorded if running(p)})
            log.info("cluster down: stopped %d processes; left: %s", len(stopped), left or "none")
            for temp_dir in (spec.head_temp_dir, spec.node_temp_dir):
                shutil.rmtree(temp_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited one not yet reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def node_ids(spec: Any) -> dict[str, str]:
    """{'head' | 'node2': Ray node id} of the live nodes, told apart by node-manager port."""
    import ray

    by_port = {
        spec.node_ports(i)["node-manager-port"]: name for i, name in enumerate(("head", "node2"))
    }
    return {by_port[n["NodeManagerPort"]]: n["NodeID"] for n in ray.nodes() if n["Alive"]}


def read_pass(dataset_dir: str, node_id: str, batch_size: int) -> dict[str, float]:
    """One streamed pass over the train split with every read task pinned to ``node_id``
    (runs as a Ray task on that node; the streaming executor lives in the task)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from mvtcae.data import open_splits

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.scheduling_strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    ctx.scheduling_strategy_large_args = ctx.scheduling_strategy
    split = open_splits(
        dataset_dir, materialize=False, splits=["train"], validate=False, shuffle_train_files=False
    )["train"]
    rows, first, start = 0, None, time.perf_counter()
    for batch in split.iter_batches(batch_size=batch_size, batch_format="numpy"):
        if first is None:
            first = time.perf_counter() - start
        rows += len(batch["sample_id"])
    total = time.perf_counter() - start
    return {"rows": rows, "total_s": total, "first_batch_s": first or 0.0}


def read_throughput(
    spec: Any,
    dataset_dir: str,
    manifest: Manifest,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Rows/s and MB/s of streamed reads on each node alone, then on both at once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = node_ids(spec)
    task = ray.remote(read_pass)
    disk_bytes = manifest.splits["train"].num_bytes

    def launch(node: str) -> Any:
        strategy = NodeAffinitySchedulingStrategy(nodes[node], soft=False)
        return task.options(num_cpus=0.25, scheduling_strategy=strategy).remote(
            dataset_dir, nodes[node], args.read_batch
        )

    def rates(passes: list[dict[str, float]], wall: list[float]) -> dict[str, Any]:
        rows = passes[0]["rows"]
        steady = [p["rows"] / max(p["total_s"] - p["first_batch_s"], 1e-9) for p in passes]
        return {
            "rows_per_s": summary([rows / w for w in wall]),
            "steady_rows_per_s": summary(steady),
            "MB_per_s_uncompressed": summary([rows * manifest.row_bytes / w / 1e6 for w in wall]),
            "MB_per_s_on_disk": summary([disk_bytes / w / 1e6 for w in wall]),
            "first_batch_s": summary([p["first_batch_s"] for p in passes]),
        }

    out: dict[str, Any] = {
        "rows": manifest.splits["train"].num_rows,
        "disk_bytes": disk_bytes,
        "shards": len(manifest.splits["train"].shards),
    }
    ray.get([launch("head"), launch("node2")])  # warm-up: worker processes and imports
    for node in ("head", "node2"):
        passes = [ray.get(launch(node)) for _ in range(args.read_repeats)]
        out[node] = rates(passes, [p["total_s"] for p in passes])
        log.info("read on %s: %s rows/s", node, fmt_summary(out[node]["rows_per_s"]))
    both, walls = [], []
    for _ in range(args.read_repeats):
        start = time.perf_counter()
        pair = ray.get([launch("head"), launch("node2")])
        walls.append(time.perf_counter() - start)
        both.append(
            {
                "rows": sum(p["rows"] for p in pair),
                "total_s": walls[-1],
                "first_batch_s": max(p["first_batch_s"] for p in pair),
            }
        )
    out["both_at_once"] = rates(both, walls)
    log.info("read on both: %s rows/s", fmt_summary(out["both_at_once"]["rows_per_s"]))
    return out


def loopback_config(args: argparse.Namespace, storage: Path, placement: str) -> ExperimentConfig:
    """A small PolyMNIST run of 2 one-CPU workers, no MLflow, every epoch's checkpoint kept."""
    data_dir = REPO / "data" / f"bench-scaling-polymnist-{args.train_rows}"
    return load_config(
        CONFIGS / "demo_polymnist.yaml",
        [
            f"name=bench-scaling-{placement.lower()}",
            f"data.dir={data_dir}",
            "data.prepare_if_missing=true",
            f"data.n_train={args.train_rows}",
            "data.n_test=512",
            f"model.latent_dim={args.latent}",
            f"model.networks={args.networks}",
            f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            "train.num_workers=2",
            "train.use_gpu=false",
            "train.resources_per_worker={CPU: 1}",
            "train.threads_per_worker=1",
            "train.precision=fp32",
            "train.grad_clip_norm=null",
            "train.schedule.name=constant",
            f"train.checkpoint.num_to_keep={args.epochs}",
            f"train.storage_path={storage}",
            f"train.placement_strategy={placement}",
        ],
    )


def worker_nodes(spec: Any) -> dict[str, str]:
    """{actor id: node name} of every Ray Train worker actor the cluster has had (the state API
    keeps dead actors too), or {} when the state API does not answer."""
    from ray.util.state import list_actors

    names = {v: k for k, v in node_ids(spec).items()}
    try:
        actors = list_actors(
            address=spec.dashboard_url,
            limit=1000,
            raise_on_missing_output=False,
            filters=[("class_name", "=", "RayTrainWorker")],
        )
    except Exception as err:  # the placement check is a nicety; the measurement stands without it
        log.warning("could not list Train workers: %s", err)
        return {}
    return {a.actor_id: names.get(a.node_id, a.node_id) for a in actors}


def train_throughput(cfg: ExperimentConfig, placement: str, spec: Any) -> dict[str, Any]:
    """A real `mvtcae.training` run (no MLflow) with the given placement; per-epoch steady
    samples/s read back from its checkpoints' metrics, first epoch excluded."""
    from mvtcae.training import build_trainer, prepare_dataset

    dataset_dir, manifest = prepare_dataset(cfg)
    trainer = build_trainer(cfg, cfg.name, dataset_dir, manifest, None, None)
    before = worker_nodes(spec)
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    placed_on = sorted(n for a, n in worker_nodes(spec).items() if a not in before)
    history = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    if len(history) != cfg.train.epochs:
        raise RuntimeError(
            f"{cfg.name}: {len(history)} epochs reported, expected {cfg.train.epochs}"
        )
    steady = [m["perf/steady_samples_per_s"] for m in history[1:]]
    params = sum(p.numel() for p in build_model(cfg, manifest).parameters() if p.requires_grad)
    steps_per_s = statistics.median(steady) / cfg.train.batch_size
    return {
        "placement": placement,
        "worker_nodes": placed_on,
        "samples_per_s": summary(steady),
        "params": params,
        "allreduce_MB_per_s_per_worker": steps_per_s * ring_bytes_per_gpu(4 * params, 2) / 1e6,
        "per_epoch": [m["perf/steady_samples_per_s"] for m in history],
        "epoch_samples_per_s": summary([m["perf/samples_per_s"] for m in history[1:]]),
        "fit_wall_s": wall,
        "val_loss": history[-1]["val/loss"],
    }


def part_loopback(args: argparse.Namespace, spec: Any) -> dict[str, Any]:
    """Start a 2-node local cluster, measure reads and 1-node vs 2-node training, stop it."""
    from mvtcae.training import prepare_dataset

    read_cfg = load_config(
        CONFIGS / "demo_polymnist.yaml",
        [
            f"data.dir={args.read_dir}",
            "data.prepare_if_missing=true",
            f"data.n_train={args.read_rows}",
        ],
    )
    read_dir, read_manifest = prepare_dataset(read_cfg)
    out: dict[str, Any] = {
        "cluster": {
            "nodes": 2,
            "logical_cpus_per_node": spec.cpus_per_node,
            "object_store_bytes_per_node": spec.object_store_bytes,
        }
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mvtcae-bench-scaling-") as storage:
        prepare_dataset(loopback_config(args, Path(storage), "prepare"))  # outside the timing
        with local_cluster(spec):
            out["read"] = read_throughput(spec, str(read_dir), read_manifest, args)
            for placement, key in (("STRICT_PACK", "one_node"), ("STRICT_SPREAD", "two_nodes")):
                cfg = loopback_config(args, Path(storage), placement)
                out[key] = train_throughput(cfg, placement, spec)
                log.info(
                    "train %s: %s samples/s, workers on %s",
                    key,
                    fmt_summary(out[key]["samples_per_s"]),
                    out[key]["worker_nodes"],
                )
    out["two_over_one"] = (
        out["two_nodes"]["samples_per_s"]["median"] / out["one_node"]["samples_per_s"]["median"]
    )
    out["settings"] = {
        k: getattr(args, k)
        for k in (
            "train_rows",
            "epochs",
            "networks",
            "latent",
            "batch_size",
            "read_repeats",
            "read_batch",
        )
    } | {"read_dir": str(args.read_dir)}
    out["wall_s"] = time.perf_counter() - started
    return out


# --- report ----------------------------------------------------------------------------------


def _mb(x: float) -> str:
    return f"{x / 2**20:.2f}"


def volume_table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'config':34s} {'net':4s} {'lat':>4s} {'N':>2s} {'b/w':>5s} {'params':>10s} "
        f"{'grad MiB':>8s} {'ring MiB@N':>10s} {'@64':>7s} {'row B':>6s} "
        f"{'batch MiB/w':>11s} {'GFLOP/smp':>9s} {'ops':>5s}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['config'][:34]:34s} {r['networks']:4s} {r['latent_dim']:4d} {r['num_workers']:2d} "
            f"{r['batch_per_worker']:5.0f} {r['params']:10,d} {_mb(r['grad_bytes_fp32']):>8s} "
            f"{_mb(r['ring_bytes_per_gpu_at_config_workers']):>10s} "
            f"{_mb(r['ring_bytes_per_gpu_at_64']):>7s} {r['row_bytes']:6d} "
            f"{_mb(r['sample_bytes_per_step_per_worker']):>11s} "
            f"{r['flops_per_sample'] / 1e9:9.3f} {r['ops_per_step']:5d}"
        )
    return "\n".join(lines)


def model_table(result: dict[str, Any], key: str = "weak") -> str:
    i, s = result["inputs"], result["single_gpu"]
    what = (
        f"weak scaling ({i['batch_per_gpu']} rows per GPU)"
        if key == "weak"
        else f"strong scaling (global batch {result['strong_global_batch']} split over N)"
    )
    lines = [
        f"{what}, {i['config']}, gradients {_mb(i['grad_bytes'])} MiB; ASSUMED GPU: a step of "
        f"{i['batch_per_gpu']} rows is {s['flop_bound_ms']:.2f} ms FLOP-bound, "
        f"{s['launch_bound_ms']:.2f} ms launch-bound",
        f"{'Gbit/s':>6s} "
        + " ".join(f"{'N=' + str(n):>15s}" for n in NS)
        + "   (samples/s: no overlap / full overlap)",
    ]
    for gbit in sorted({p["gbit"] for p in result[key]}):
        cells = [
            f"{p['samples_per_s_no_overlap']:7.0f}/{p['samples_per_s_full_overlap']:<7.0f}"
            for p in result[key]
            if p["gbit"] == gbit
        ]
        lines.append(f"{gbit:6.0f} " + " ".join(cells))
    if key == "strong":
        return "\n".join(lines)
    lines.append(
        "batch per GPU at N=64 (samples/s no overlap / full overlap): "
        + "  ".join(f"{size}" for size in BATCH_SWEEP)
    )
    for gbit in sorted({p["gbit"] for p in result["batch_sweep_at_64"]}):
        cells = [
            f"{p['samples_per_s_no_overlap']:.0f}/{p['samples_per_s_full_overlap']:.0f}"
            for p in result["batch_sweep_at_64"]
            if p["gbit"] == gbit
        ]
        lines.append(f"{gbit:6.0f} Gbit/s: " + "  ".join(cells))
    d = result["data_rate_single_gpu"]
    lines.append(
        f"data per GPU for <5% wait: pipelined {d['pipelined_rows_per_s']:.0f} rows/s "
        f"({d['pipelined_bytes_per_s'] / 1e6:.0f} MB/s); not overlapped "
        f"{d['blocking_rows_per_s']:.0f} rows/s ({d['blocking_bytes_per_s'] / 1e6:.0f} MB/s)"
    )
    return "\n".join(lines)


def loopback_table(result: dict[str, Any]) -> str:
    r = result["read"]
    lines = [f"Ray Data read, {r['rows']} rows in {r['shards']} shards, median [min, max]:"]
    for node in ("head", "node2", "both_at_once"):
        x = r[node]
        lines.append(
            f"  {node:13s} {fmt_summary(x['rows_per_s']):>22s} rows/s "
            f"{fmt_summary(x['MB_per_s_uncompressed'], 1):>20s} MB/s   first batch "
            f"{fmt_summary(x['first_batch_s'], 2)} s   after it "
            f"{fmt_summary(x['steady_rows_per_s'])} rows/s"
        )
    lines.append("training, 2 workers x 1 CPU, steady samples/s median [min, max]:")
    for key in ("one_node", "two_nodes"):
        x = result[key]
        lines.append(
            f"  {key:10s} {x['placement']:13s} {fmt_summary(x['samples_per_s']):>24s}   "
            f"fit {x['fit_wall_s']:.0f} s   workers on {','.join(x['worker_nodes']) or '?'}"
        )
    lines.append(f"  two nodes / one node = {result['two_over_one']:.2f}")
    return "\n".join(lines)


def save(out_path: Path, part: str, result: Any) -> None:
    """Merge this part's result into the JSON file (other parts' results are kept)."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out_path.read_text()) if out_path.is_file() else {}
    existing[part] = {
        "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "host": os.uname().nodename,
            "torch": torch.__version__,
        },
        "result": result,
    }
    out_path.write_text(json.dumps(existing, indent=2))


def main() -> None:
    """Run the chosen parts; print their tables and merge them into the JSON file."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _args()
    parts = ("volume", "model", "loopback") if args.part == "all" else (args.part,)
    spec = cluster_spec(args.out.parent / "bench_scaling_cluster") if "loopback" in parts else None
    tables = []
    with cluster_environment(spec) if spec else contextlib.nullcontext():
        for part in parts:
            if part == "volume":
                result: Any = part_volume(args)
                tables.append(volume_table(result))
            elif part == "model":
                result = part_model(args)
                tables += [model_table(result, "weak"), model_table(result, "strong")]
            else:
                result = part_loopback(args, spec)
                tables.append(loopback_table(result))
            save(args.out, part, result)
    print("\n\n".join(tables))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
