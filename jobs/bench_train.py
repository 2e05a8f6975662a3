"""Training throughput: Ray Train (1 and 2 workers, Ray Data input, fp32 and bf16) against a
plain fp32 PyTorch loop over the same data held in memory, same model, batch 256.

For each network family (default MLP and conv, PolyMNIST-sized, latent 512) it runs, in one
process: the plain loop (fp32, and bf16 for reference) and four real `mvtcae.training` runs.
Steady-state samples/s is the per-epoch training throughput after the first (warm-up) epoch,
printed as median [min, max]; the fixed start-up overhead of a Ray run (cluster, workers,
process group, data pipeline, first-epoch warm-up excluded) is reported separately as the
`fit()` wall time minus the time spent in epochs. The short runs' final validation losses show
whether bf16 stays within the fp32 run-to-run noise (fp32 with 1 vs 2 workers).

    .venv/bin/python jobs/bench_train.py [--rows 4096] [--epochs 5] [--networks mlp,conv]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mvtcae.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096, help="training tuples (MLP)")
    p.add_argument("--conv-rows", type=int, default=1024, help="training tuples (conv)")
    p.add_argument(
        "--epochs", type=int, default=5, help="epochs per measurement (first is warm-up)"
    )
    p.add_argument("--networks", default="mlp,conv")
    p.add_argument("--latent", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data-dir", type=Path, default=REPO / "data" / "bench-polymnist")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "bench" / "bench_train.json")
    return p.parse_args()


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:8.0f} [{s['min']:.0f}, {s['max']:.0f}]"


def _config(data_dir: Path, rows: int, networks: str, latent: int, batch: int, epochs: int,
            storage: Path, workers: int, precision: str) -> Any:  # fmt: skip
    cpus = 2 // workers
    return load_config(
        DEMO_CONFIG,
        [
            f"name=bench-{networks}-{workers}w-{precision}",
            "data.dataset=polymnist", f"data.dir={data_dir}", f"data.n_train={rows}",
            "data.n_test=512",
            f"model.latent_dim={latent}", f"model.networks={networks}",
            f"train.epochs={epochs}", f"train.batch_size={batch}", f"train.num_workers={workers}",
            "train.use_gpu=false", f"train.resources_per_worker={{CPU: {cpus}}}",
            f"train.threads_per_worker={cpus}", f"train.precision={precision}",
            "train.grad_clip_norm=null", f"train.checkpoint.num_to_keep={epochs}",
            f"train.storage_path={storage}", "train.local_num_cpus=4",
        ],
    )  # fmt: skip


def plain_loop(cfg: Any, dataset_dir: Path, manifest: Any, precision: str) -> dict[str, Any]:
    """The baseline: one process, all cores, tensors in memory, the same model and step."""
    from mvtcae import MVTCAE, MultimodalBatch
    from mvtcae.data import load_split_arrays
    from mvtcae.training import build_optimizer, model_config_for, run_train_epoch

    torch.set_num_threads(2)
    torch.manual_seed(cfg.train.seed)
    arrays = load_split_arrays(dataset_dir, "train")
    data = {
        m: torch.from_numpy(x).float().mul_(manifest.modalities[m].scale)
        for m, x in arrays["data"].items()
    }
    n = next(iter(data.values())).shape[0]
    model = MVTCAE(model_config_for(cfg.model, manifest))
    optimizer = build_optimizer(model.parameters(), cfg.train)
    tc = cfg.train.model_copy(update={"precision": precision})
    rates = []
    for _ in range(cfg.train.epochs):
        order = torch.randperm(n)
        bs = cfg.train.batch_size
        batches = (
            MultimodalBatch(data={m: x[order[i : i + bs]] for m, x in data.items()})
            for i in range(0, n, bs)
        )
        sums = run_train_epoch(model, batches, optimizer, torch.device("cpu"), tc)
        rates.append(sums["rows"] / (sums["time_s"] - sums["first_batch_s"]))
    return {"samples_per_s": _summary(rates[1:]), "per_epoch": rates}


def ray_run(cfg: Any) -> dict[str, Any]:
    """A real `mvtcae.training` run without MLflow; per-epoch metrics read from its checkpoints."""
    import ray

    from mvtcae.training import build_trainer, prepare_dataset

    dataset_dir, manifest = prepare_dataset(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False
    trainer = build_trainer(cfg, cfg.name, dataset_dir, manifest, None, None)
    start = time.perf_counter()
    result = trainer.fit()
    wall = time.perf_counter() - start
    history = sorted((m for _, m in result.best_checkpoints), key=lambda m: m["epoch"])
    if len(history) != cfg.train.epochs:
        raise RuntimeError(
            f"{cfg.name}: {len(history)} epochs reported, expected {cfg.train.epochs}"
        )
    rates = [m["perf/steady_samples_per_s"] for m in history]
    epochs_time = sum(m["perf/epoch_time_s"] for m in history)
    return {
        "samples_per_s": _summary(rates[1:]),
        "per_epoch": rates,
        "fit_wall_s": wall,
        "startup_overhead_s": wall - epochs_time,
        "first_epoch_s": history[0]["perf/epoch_time_s"],
        "epoch_samples_per_s": _summary([m["perf/samples_per_s"] for m in history[1:]]),
        "first_batch_wait_s": _summary([m["perf/first_batch_s"] for m in history[1:]]),
        "val_loss": history[-1]["val/loss"],
        "train_loss": history[-1]["train/loss"],
    }


def bench_network(args: argparse.Namespace, networks: str, storage: Path) -> dict[str, Any]:
    """All measurements for one network family."""
    from mvtcae.training import prepare_dataset

    rows = args.rows if networks == "mlp" else args.conv_rows
    data_dir = args.data_dir.with_name(f"{args.data_dir.name}-{rows}")
    base = _config(
        data_dir, rows, networks, args.latent, args.batch_size, args.epochs, storage, 1, "fp32"
    )
    dataset_dir, manifest = prepare_dataset(base)
    out: dict[str, Any] = {"rows": rows}
    print(f"\n== {networks}: {rows} tuples, latent {args.latent}, batch {args.batch_size}, "
          f"{args.epochs} epochs (first = warm-up)", flush=True)  # fmt: skip
    for precision in ("fp32", "bf16"):
        out[f"plain_{precision}"] = plain_loop(base, dataset_dir, manifest, precision)
        print(
            f"  plain loop {precision}: {_fmt(out[f'plain_{precision}']['samples_per_s'])} samples/s",
            flush=True,
        )
    for workers in (1, 2):
        for precision in ("fp32", "bf16"):
            cfg = _config(data_dir, rows, networks, args.latent, args.batch_size, args.epochs,
                          storage, workers, precision)  # fmt: skip
            key = f"ray_{workers}w_{precision}"
            out[key] = ray_run(cfg)
            r = out[key]
            print(f"  ray {workers}w {precision}: {_fmt(r['samples_per_s'])} samples/s steady "
                  f"({r['epoch_samples_per_s']['median']:.0f} over whole epochs, first-batch wait "
                  f"{r['first_batch_wait_s']['median']:.2f} s/epoch), start-up "
                  f"{r['startup_overhead_s']:.1f} s, val/loss {r['val_loss']:.2f}", flush=True)  # fmt: skip
    return out


def report(results: dict[str, Any]) -> str:
    """The summary table: throughput, ratios to the plain fp32 loop, start-up, validation."""
    lines = []
    for networks, r in results.items():
        base = r["plain_fp32"]["samples_per_s"]["median"]
        lines.append(
            f"\n{networks} ({r['rows']} tuples)   samples/s median [min, max]   x plain fp32   start-up s   val/loss"
        )
        for key in (
            "plain_fp32",
            "plain_bf16",
            "ray_1w_fp32",
            "ray_1w_bf16",
            "ray_2w_fp32",
            "ray_2w_bf16",
        ):
            s = r[key]
            ratio = s["samples_per_s"]["median"] / base
            startup = f"{s['startup_overhead_s']:10.1f}" if "startup_overhead_s" in s else " " * 10
            val = f"{s['val_loss']:10.2f}" if "val_loss" in s else ""
            lines.append(
                f"  {key:12s} {_fmt(s['samples_per_s'])}   {ratio:10.2f}   {startup}   {val}"
            )
        noise = abs(r["ray_1w_fp32"]["val_loss"] - r["ray_2w_fp32"]["val_loss"])
        gap = abs(r["ray_1w_bf16"]["val_loss"] - r["ray_1w_fp32"]["val_loss"])
        lines.append(f"  bf16 vs fp32 val/loss gap {gap:.3f}; fp32 run-to-run gap {noise:.3f}")
        lines.append(
            f"  targets: ray 1w fp32 / plain fp32 = {r['ray_1w_fp32']['samples_per_s']['median'] / base:.2f} (>= 0.95); "
            f"best bf16 / plain fp32 = {max(r[k]['samples_per_s']['median'] for k in ('ray_1w_bf16', 'ray_2w_bf16')) / base:.2f} (>= 2)"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every measurement and print and save the summary."""
    import ray

    args = _args()
    t0 = time.perf_counter()
    ray.init(num_cpus=4)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (fixed cost, once per process)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="mvtcae-bench-") as storage:
        for networks in args.networks.split(","):
            results[networks] = bench_network(args, networks, Path(storage) / networks)
    ray.shutdown()
    text = report(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
