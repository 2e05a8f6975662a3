"""Benchmark of the data path: Parquet shards -> MultimodalBatch (torch).

Measures, in one run:
  * throughput (rows/s and MB/s of stored, uncompressed bytes) of one full epoch through the
    Ray Data path (``open_splits`` + ``iter_model_batches``), streaming and materialised,
    against plain pyarrow reading of the same shards into the same batches
    (``pq.read_table`` + ``to_model_batch``); variants interleaved within each repeat so
    machine load hits them alike; median and spread (min-max) over repeats, and the ratio;
  * peak memory while streaming datasets 1x, 2x, 4x... the size of the object store: the
    driver's resident set and the proportional set size (PSS) summed over the driver and the
    Ray processes it started; flat peaks mean streaming does not hold the dataset.

The dataset is the PolyMNIST re-creation (5 x 3x28x28 uint8, about 11.8 kB a row), written
once into --work-dir (reused when present). Ray is started locally with a small object store
and ``DataContext.target_max_block_size`` = 16 MiB; under ``ray job submit`` (RAY_ADDRESS
set) the job joins the cluster instead, and only the driver's own memory is measured.

Run: ``python jobs/bench_data.py`` (``--help`` for options); ``--json FILE`` saves figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray

from mvtcae.data import (
    Manifest,
    iter_model_batches,
    load_manifest,
    open_splits,
    prepare_polymnist,
    to_model_batch,
)
from mvtcae.data.format import ID_COLUMN, LABEL_COLUMN, presence_column
from mvtcae.data.ray_input import READ_CONCURRENCY, READ_TASK_CPUS
from mvtcae.data.validate import tensor_column_numpy

MiB = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "mvtcae-bench-data"
    )
    p.add_argument("--rows", type=int, default=10_000, help="rows of the throughput dataset")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed epochs per variant")
    p.add_argument("--object-store-mb", type=int, default=100, help="local object store size")
    p.add_argument("--scales", default="1,2,4", help="streamed dataset sizes, x object store")
    p.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1))
    p.add_argument("--max-memory-rows", type=int, default=150_000, help="cap on streamed rows")
    p.add_argument("--skip-memory", action="store_true", help="throughput only")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return p.parse_args()


# ---------------------------------------------------------------- datasets and Ray


def ensure_dataset(path: Path, rows: int) -> Manifest:
    """The PolyMNIST re-creation with ``rows`` train rows at ``path`` (written if absent)."""
    if (path / "manifest.json").is_file():
        manifest = load_manifest(path)
        if manifest.splits["train"].num_rows == rows:
            return manifest
    print(f"writing {rows} rows to {path}")
    return prepare_polymnist(path, n_train=rows, n_test=256, overwrite=True, progress=True)


def start_ray(args: argparse.Namespace) -> bool:
    """Join RAY_ADDRESS if set, else start a local Ray with a small object store.

    Returns whether Ray runs as children of this process (so their memory can be summed).
    """
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
        local = False
    else:
        ray.init(
            address="local",
            num_cpus=args.num_cpus,
            object_store_memory=args.object_store_mb * MiB,
            log_to_driver=False,
        )
        local = True
    context = ray.data.DataContext.get_current()
    context.target_max_block_size = 16 * MiB
    context.enable_progress_bars = False
    return local


# ---------------------------------------------------------------- the two read paths


def pyarrow_batches(root: Path, manifest: Manifest, batch_size: int) -> Iterator:
    """Plain pyarrow: read each shard, slice it into batches, convert like the Ray path."""
    for path in manifest.shard_paths(root, "train"):
        table = pq.read_table(path)
        columns = {ID_COLUMN: table.column(ID_COLUMN).to_numpy()}
        if manifest.has_labels:
            columns[LABEL_COLUMN] = table.column(LABEL_COLUMN).to_numpy()
        for name, spec in manifest.modalities.items():
            columns[name] = tensor_column_numpy(table.column(name), spec)
            columns[presence_column(name)] = table.column(presence_column(name)).to_numpy()
        for start in range(0, table.num_rows, batch_size):
            part = {k: v[start : start + batch_size] for k, v in columns.items()}
            yield to_model_batch(part, manifest, "cpu")


def timed_epoch(batches: Iterator) -> tuple[float, int]:
    """Seconds to exhaust the iterator and the rows it produced."""
    start = time.perf_counter()
    rows = sum(len(batch) for batch in batches)
    return time.perf_counter() - start, rows


def throughput(root: Path, manifest: Manifest, args: argparse.Namespace) -> dict:
    """Per-variant epoch times over ``args.repeats`` interleaved repeats."""
    streaming = open_splits(root, materialize=False, splits=["train"])["train"]
    materialized = open_splits(root, materialize=True, splits=["train"])["train"]
    variants: dict[str, Callable[[], Iterator]] = {
        "pyarrow": lambda: pyarrow_batches(root, manifest, args.batch_size),
        "ray_streaming": lambda: iter_model_batches(streaming, manifest, args.batch_size),
        "ray_materialized": lambda: iter_model_batches(materialized, manifest, args.batch_size),
        "ray_streaming_shuffled": lambda: iter_model_batches(
            streaming, manifest, args.batch_size, shuffle=True
        ),
    }
    for make in variants.values():  # warm-up: imports, worker start, page cache
        timed_epoch(make())
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows = manifest.splits["train"].num_rows
    for _ in range(args.repeats):
        for name, make in variants.items():
            seconds, seen = timed_epoch(make())
            assert seen == rows, f"{name}: read {seen} rows, expected {rows}"
            times[name].append(seconds)
    stored_mb = rows * manifest.row_bytes / 1e6
    return {
        name: {
            "seconds": t,
            "rows_per_s": [rows / s for s in t],
            "mb_per_s": [stored_mb / s for s in t],
        }
        for name, t in times.items()
    }


# ---------------------------------------------------------------- memory while streaming


def _pids_under(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [root_pid]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _proc_kib(pid: int, file: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{file}") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples, every ``interval`` s, the driver's RSS and the PSS summed over its process tree."""

    def __init__(self, include_children: bool, interval: float = 0.2) -> None:
        self.include_children = include_children
        self.interval = interval
        self.peak_driver_kib = 0
        self.peak_total_kib = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            driver = _proc_kib(me, "status", "VmRSS:")
            pids = _pids_under(me) if self.include_children else [me]
            total = sum(_proc_kib(pid, "smaps_rollup", "Pss:") for pid in pids)
            self.peak_driver_kib = max(self.peak_driver_kib, driver)
            self.peak_total_kib = max(self.peak_total_kib, total)
            self.peak_processes = max(self.peak_processes, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def spilled_mib() -> float:
    """Bytes Ray has spilled to disk so far in this cluster, in MiB (NaN if unavailable)."""
    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(ray.get_runtime_context().gcs_address)
        return get_memory_info_reply(state).store_stats.spilled_bytes_total / MiB
    except Exception:  # noqa: BLE001 - a missing figure must not stop the benchmark
        return float("nan")


def memory_profile(root: Path, manifest: Manifest, args: argparse.Namespace, local: bool) -> list:
    """Stream the first k shards (k for each scale) once, sampling peak memory."""
    store = ray.cluster_resources().get("object_store_memory", args.object_store_mb * MiB)
    shards = manifest.splits["train"].shards
    paths = manifest.shard_paths(root, "train")
    results = []
    for scale in [float(s) for s in args.scales.split(",")]:
        target, count, size = scale * store, 0, 0
        while count < len(shards) and size < target:
            size += shards[count].num_rows * manifest.row_bytes
            count += 1
        dataset = ray.data.read_parquet(
            [str(p) for p in paths[:count]],
            num_cpus=READ_TASK_CPUS,
            concurrency=READ_CONCURRENCY,
            partitioning=None,
        )
        spilled_before = spilled_mib()
        with MemorySampler(include_children=local) as sampler:
            seconds, rows = timed_epoch(iter_model_batches(dataset, manifest, args.batch_size))
        results.append(
            {
                "scale": scale,
                "rows": rows,
                "dataset_mb": size / 1e6,
                "object_store_mb": store / 1e6,
                "seconds": seconds,
                "peak_driver_rss_mb": sampler.peak_driver_kib * 1024 / 1e6,
                "peak_total_pss_mb": sampler.peak_total_kib * 1024 / 1e6 if local else None,
                "peak_processes": sampler.peak_processes,
                "spilled_mib": spilled_mib() - spilled_before,
            }
        )
        print(f"  streamed {rows} rows ({size / 1e6:.0f} MB) in {seconds:.1f} s")
    return results


# ---------------------------------------------------------------- report


def spread(values: list[float]) -> str:
    """``median [min-max]`` with 3 significant figures."""
    return f"{statistics.median(values):,.4g} [{min(values):,.4g}-{max(values):,.4g}]"


def print_throughput(results: dict, manifest: Manifest, args: argparse.Namespace) -> None:
    rows = manifest.splits["train"].num_rows
    base = statistics.median(results["pyarrow"]["rows_per_s"])
    print(
        f"\nThroughput: {rows} rows x {manifest.row_bytes} B stored, batch {args.batch_size}, "
        f"{args.repeats} repeats, median [min-max]"
    )
    print(f"{'variant':<24}{'epoch s':>26}{'rows/s':>30}{'MB/s':>26}{'vs pyarrow':>12}")
    for name, r in results.items():
        ratio = statistics.median(r["rows_per_s"]) / base
        print(
            f"{name:<24}{spread(r['seconds']):>26}{spread(r['rows_per_s']):>30}"
            f"{spread(r['mb_per_s']):>26}{ratio:>11.2f}x"
        )


def print_memory(results: list) -> None:
    print("\nPeak memory while streaming once (MB)")
    print(
        f"{'x store':>8}{'rows':>9}{'data MB':>10}{'store MB':>10}{'driver RSS':>12}"
        f"{'total PSS':>11}{'processes':>11}{'spilled MiB':>13}{'s':>7}"
    )
    for r in results:
        total = "n/a" if r["peak_total_pss_mb"] is None else f"{r['peak_total_pss_mb']:.0f}"
        print(
            f"{r['scale']:>8g}{r['rows']:>9}{r['dataset_mb']:>10.0f}{r['object_store_mb']:>10.0f}"
            f"{r['peak_driver_rss_mb']:>12.0f}{total:>11}{r['peak_processes']:>11}"
            f"{r['spilled_mib']:>13.0f}"
            f"{r['seconds']:>7.1f}"
        )


def main() -> None:
    args = parse_args()
    local = start_ray(args)
    store = ray.cluster_resources().get("object_store_memory", args.object_store_mb * MiB)
    figures: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    root = args.work_dir / f"polymnist-{args.rows}"
    manifest = ensure_dataset(root, args.rows)
    figures["throughput"] = throughput(root, manifest, args)
    print_throughput(figures["throughput"], manifest, args)
    if not args.skip_memory:
        max_scale = max(float(s) for s in args.scales.split(","))
        big_rows = int(np.ceil(max_scale * store / manifest.row_bytes)) + 1500
        big_rows = min(big_rows, args.max_memory_rows)
        big_root = args.work_dir / f"polymnist-{big_rows}"
        big = ensure_dataset(big_root, big_rows)
        figures["memory"] = memory_profile(big_root, big, args, local)
        print_memory(figures["memory"])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
