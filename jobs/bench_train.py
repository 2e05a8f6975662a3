"""Training throughput: Ray Train (1 and 2 workers, Ray Data input, fp32 and bf16) against a
plain fp32 PyTorch loop over the same data held in memory, same model, batch 256, and against
the reference library's own trainer (multivae 1.0.3 `BaseTrainer`, fp32) on the same shapes.

For each network family (default MLP and conv, PolyMNIST-sized, latent 512) it runs, in one
process: the plain loop (fp32, and bf16 for reference), multivae's `BaseTrainer` (MLP only: its
default networks are MLPs; skipped with a message when multivae is not installed) and four real
`mvtcae.training` runs, then the plain fp32 loop again (its epochs before and after the Ray
runs together are the fp32 baseline, so that drift of a shared machine shows and evens out).
The two targets printed per family are "Ray Train 1 worker fp32 / plain fp32 loop" (>= 0.97)
and "best Ray Train configuration / multivae BaseTrainer fp32" (>= 2.5).
Steady-state samples/s is the per-epoch training throughput after the first (warm-up) epoch,
printed as median [min, max]; the fixed start-up overhead of a Ray run (cluster, workers,
process group, data pipeline, first-epoch warm-up excluded) is reported separately as the
`fit()` wall time minus the time spent in epochs. The short runs' final validation losses show
whether bf16 stays within the fp32 run-to-run noise (fp32 with 1 vs 2 workers; with
``--seeds N``, Ray Train 1 worker fp32 and bf16 over N seeds each).

    .venv/bin/python jobs/bench_train.py [--rows 4096] [--epochs 5] [--networks mlp,conv] [--seeds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from multivae_reference import import_multivae
from mvtcae.config import load_config

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "jobs" / "configs" / "demo.yaml"
RAY_KEYS = ("ray_1w_fp32", "ray_1w_bf16", "ray_2w_fp32", "ray_2w_bf16")
TARGET_RAY_OVER_PLAIN = 0.97
TARGET_BEST_OVER_MULTIVAE = 2.5


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
    p.add_argument(
        "--seeds",
        type=int,
        default=1,
        help="with N > 1, Ray Train 1 worker fp32 and bf16 also run with seeds 1..N-1, to set "
        "bf16's validation loss against fp32's run-to-run spread over N seeds",
    )
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


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """This machine's n x n x n matmul throughput in GFLOP/s at 2 threads (median of repeats):
    the ceiling the training throughputs are set against."""
    torch.set_num_threads(2)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def step_flops_per_sample(cfg: Any, manifest: Any) -> float:
    """FLOPs of one training step (loss forward and backward, fp32) per sample, counted by
    torch's FlopCounterMode on a batch of ``train.batch_size`` rows (matmuls and convolutions;
    the optimizer's elementwise update is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mvtcae import MVTCAE, MultimodalBatch
    from mvtcae.training import model_config_for

    model = MVTCAE(model_config_for(cfg.model, manifest))
    n = cfg.train.batch_size
    batch = MultimodalBatch(
        data={m: torch.rand(n, *spec.shape) for m, spec in manifest.modalities.items()}
    )
    with FlopCounterMode(display=False) as counter:
        model(batch).loss.backward()
    return counter.get_total_flops() / n


def _config(
    data_dir: Path,
    rows: int,
    networks: str,
    latent: int,
    batch: int,
    epochs: int,
    storage: Path,
    workers: int,
    precision: str,
    seed: int = 0,
) -> Any:
    cpus = 2 // workers
    return load_config(
        DEMO_CONFIG,
        [
            f"name=bench-{networks}-{workers}w-{precision}" + (f"-seed{seed}" if seed else ""),
            f"train.seed={seed}",
            "data.dataset=polymnist",
            f"data.dir={data_dir}",
            "data.prepare_if_missing=true",
            f"data.n_train={rows}",
            "data.n_test=512",
            f"model.latent_dim={latent}",
            f"model.networks={networks}",
            f"train.epochs={epochs}",
            f"train.batch_size={batch}",
            f"train.num_workers={workers}",
            "train.use_gpu=false",
            f"train.resources_per_worker={{CPU: {cpus}}}",
            f"train.threads_per_worker={cpus}",
            f"train.precision={precision}",
            "train.grad_clip_norm=null",
            f"train.checkpoint.num_to_keep={epochs}",
            f"train.storage_path={storage}",
            "train.local_num_cpus=4",
        ],
    )


def _train_tensors(dataset_dir: Path, manifest: Any) -> dict[str, torch.Tensor]:
    """The training split as float tensors in memory, scaled as the model sees them."""
    from mvtcae.data import load_split_arrays

    arrays = load_split_arrays(dataset_dir, "train")
    return {
        m: torch.from_numpy(x).float().mul_(manifest.modalities[m].scale)
        for m, x in arrays["data"].items()
    }


def plain_loop(cfg: Any, dataset_dir: Path, manifest: Any, precision: str) -> dict[str, Any]:
    """The baseline: one process, all cores, tensors in memory, the same model and step."""
    from mvtcae import MVTCAE, MultimodalBatch
    from mvtcae.training import build_optimizer, model_config_for, run_train_epoch

    torch.set_num_threads(2)
    torch.manual_seed(cfg.train.seed)
    data = _train_tensors(dataset_dir, manifest)
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


def _reference_model(mv: types.SimpleNamespace, ours: Any) -> torch.nn.Module:
    """multivae's MVTCAE with our model config's shapes, loss weights and likelihoods.

    Its default networks are used. Encoders: Linear(in, 512), ReLU, Linear(512, 512), ReLU,
    then Linear heads for mu and log-variance. Decoders: Linear(latent, 512), ReLU,
    Linear(512, out), Sigmoid. Our `mlp` networks have the same layers and sizes without that
    final Sigmoid, which costs one elementwise pass over each reconstruction.
    """
    config = mv.Config(
        n_modalities=ours.n_modalities,
        latent_dim=ours.latent_dim,
        input_dims=dict(ours.input_dims),
        uses_likelihood_rescaling=ours.uses_likelihood_rescaling,
        rescale_factors=ours.rescale_factors,
        decoders_dist=dict(ours.decoders_dist),
        decoder_dist_params=ours.decoder_dist_params,
        alpha=ours.alpha,
        beta=ours.beta,
    )
    return mv.MVTCAE(config)


def _epoch_timer(mv: types.SimpleNamespace) -> Any:
    """A multivae training callback that records, per epoch, the time of the pass over the
    training batches (`train_step`) and of the whole epoch (which adds the trainer's copy of
    the best model and its logging)."""

    class EpochTimer(mv.Callback):
        def __init__(self) -> None:
            self.train_pass_s: list[float] = []
            self.epoch_s: list[float] = []
            self._epoch_start = self._pass_start = self._last_batch_end = 0.0

        def on_epoch_begin(self, training_config: Any, **kwargs: Any) -> None:
            self._epoch_start = time.perf_counter()

        def on_train_step_begin(self, training_config: Any, **kwargs: Any) -> None:
            self._pass_start = time.perf_counter()

        def on_train_step_end(self, training_config: Any, **kwargs: Any) -> None:
            self._last_batch_end = time.perf_counter()

        def on_epoch_end(self, training_config: Any, **kwargs: Any) -> None:
            self.train_pass_s.append(self._last_batch_end - self._pass_start)
            self.epoch_s.append(time.perf_counter() - self._epoch_start)

    return EpochTimer()


@contextlib.contextmanager
def _quiet_multivae() -> Iterator[None]:
    """Silence multivae's progress bars and INFO logging, and undo the MASTER_ADDR/MASTER_PORT
    it writes into the environment, so that neither leaks into the report or the Ray runs."""
    saved = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def multivae_loop(cfg: Any, dataset_dir: Path, manifest: Any) -> dict[str, Any]:
    """multivae 1.0.3's own BaseTrainer (fp32, CPU, 2 threads, Adam lr 1e-3, same batch size and
    epochs, no eval set, no extra callbacks) on the same arrays and model config as the plain
    loop. Steady samples/s counts the pass over the training batches after the first epoch;
    returns {"skipped": reason} when multivae is missing or the networks are not MLPs."""
    if cfg.model.networks != "mlp":
        return {"skipped": f"networks={cfg.model.networks}: multivae's default networks are MLPs"}
    try:
        mv = import_multivae()
    except ImportError as exc:
        return {"skipped": f"multivae is not importable ({exc})"}
    from mvtcae import MVTCAE
    from mvtcae.training import model_config_for

    torch.set_num_threads(2)
    ours = model_config_for(cfg.model, manifest)
    model = _reference_model(mv, ours)
    dataset = mv.Dataset(data=_train_tensors(dataset_dir, manifest))
    timer = _epoch_timer(mv)
    with tempfile.TemporaryDirectory(prefix="multivae-bench-") as out, _quiet_multivae():
        trainer_config = mv.TrainerConfig(
            output_dir=out,
            per_device_train_batch_size=cfg.train.batch_size,
            num_epochs=cfg.train.epochs,
            optimizer_cls="Adam",
            learning_rate=1e-3,
            seed=cfg.train.seed,
            no_cuda=True,
        )
        trainer = mv.Trainer(model, dataset, training_config=trainer_config, callbacks=[timer])
        trainer.train()
    rows = len(dataset)
    rates = [rows / s for s in timer.train_pass_s]
    return {
        "samples_per_s": _summary(rates[1:]),
        "per_epoch": rates,
        "epoch_samples_per_s": _summary([rows / s for s in timer.epoch_s[1:]]),
        "params": sum(p.numel() for p in model.parameters()),
        "params_ours": sum(p.numel() for p in MVTCAE(ours).parameters()),
    }


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
    out: dict[str, Any] = {"rows": rows, "flops_per_sample": step_flops_per_sample(base, manifest)}
    print(
        f"\n== {networks}: {rows} tuples, latent {args.latent}, batch {args.batch_size}, "
        f"{args.epochs} epochs (first = warm-up)",
        flush=True,
    )
    for precision in ("fp32", "bf16"):
        out[f"plain_{precision}"] = plain_loop(base, dataset_dir, manifest, precision)
        print(
            f"  plain loop {precision}: {_fmt(out[f'plain_{precision}']['samples_per_s'])} samples/s",
            flush=True,
        )
    out["multivae_fp32"] = r = multivae_loop(base, dataset_dir, manifest)
    if "skipped" in r:
        print(f"  multivae BaseTrainer fp32: skipped, {r['skipped']}", flush=True)
    else:
        print(
            f"  multivae BaseTrainer fp32: {_fmt(r['samples_per_s'])} samples/s steady "
            f"({r['epoch_samples_per_s']['median']:.0f} over whole epochs), "
            f"{r['params']:,} parameters (ours {r['params_ours']:,})",
            flush=True,
        )
    for workers in (1, 2):
        for precision in ("fp32", "bf16"):
            cfg = _config(
                data_dir,
                rows,
                networks,
                args.latent,
                args.batch_size,
                args.epochs,
                storage,
                workers,
                precision,
            )
            key = f"ray_{workers}w_{precision}"
            out[key] = ray_run(cfg)
            r = out[key]
            print(
                f"  ray {workers}w {precision}: {_fmt(r['samples_per_s'])} samples/s steady "
                f"({r['epoch_samples_per_s']['median']:.0f} over whole epochs, first-batch wait "
                f"{r['first_batch_wait_s']['median']:.2f} s/epoch), start-up "
                f"{r['startup_overhead_s']:.1f} s, val/loss {r['val_loss']:.2f}",
                flush=True,
            )
    bracket_plain_fp32(out, base, dataset_dir, manifest)
    if args.seeds > 1:
        out["seeds"] = seed_spread(args, data_dir, rows, networks, storage, out)
    return out


def bracket_plain_fp32(out: dict[str, Any], cfg: Any, dataset_dir: Path, manifest: Any) -> None:
    """Run the plain fp32 loop again after the Ray runs, so that the ratios to it span the
    same stretch of time as the Ray runs (a shared machine drifts): ``plain_fp32`` becomes the
    steady epochs of both runs, and ``plain_fp32_drift`` the second's median over the first's."""
    before = out["plain_fp32"]
    after = plain_loop(cfg, dataset_dir, manifest, "fp32")
    drift = after["samples_per_s"]["median"] / before["samples_per_s"]["median"]
    out["plain_fp32"] = {
        "samples_per_s": _summary(before["per_epoch"][1:] + after["per_epoch"][1:]),
        "per_epoch": before["per_epoch"] + after["per_epoch"],
        "before": before,
        "after": after,
    }
    out["plain_fp32_drift"] = drift
    print(
        f"  plain loop fp32 again after the Ray runs: {_fmt(after['samples_per_s'])} samples/s "
        f"(x{drift:.2f} the first run; the ratios use both)",
        flush=True,
    )


def seed_spread(
    args: argparse.Namespace,
    data_dir: Path,
    rows: int,
    networks: str,
    storage: Path,
    out: dict[str, Any],
) -> dict[str, Any]:
    """Final validation losses of Ray Train 1 worker fp32 and bf16 over ``args.seeds`` seeds
    (seed 0 is the main run): does bf16 stay within fp32's run-to-run spread?"""
    losses: dict[str, list[float]] = {}
    for precision in ("fp32", "bf16"):
        losses[precision] = [out[f"ray_1w_{precision}"]["val_loss"]]
        for seed in range(1, args.seeds):
            cfg = _config(
                data_dir,
                rows,
                networks,
                args.latent,
                args.batch_size,
                args.epochs,
                storage,
                1,
                precision,
                seed,
            )
            losses[precision].append(ray_run(cfg)["val_loss"])
            print(
                f"  ray 1w {precision} seed {seed}: val/loss {losses[precision][-1]:.2f}",
                flush=True,
            )
    fp32, bf16 = _summary(losses["fp32"]), _summary(losses["bf16"])
    gap = abs(bf16["median"] - fp32["median"])
    return {
        "val_loss": losses,
        "fp32": fp32,
        "bf16": bf16,
        "median_gap": gap,
        "fp32_spread": fp32["max"] - fp32["min"],
    }


def _median(r: dict[str, Any], key: str) -> float:
    return r[key]["samples_per_s"]["median"]


def _targets(r: dict[str, Any]) -> str:
    """The two throughput targets: Ray 1 worker fp32 against the plain fp32 loop, and the best
    Ray configuration against multivae's BaseTrainer (omitted when that did not run)."""
    ray_vs_plain = _median(r, "ray_1w_fp32") / _median(r, "plain_fp32")
    text = f"  targets: ray 1w fp32 / plain fp32 = {ray_vs_plain:.2f} (>= {TARGET_RAY_OVER_PLAIN})"
    reference = r.get("multivae_fp32", {"skipped": "not run"})
    if "skipped" in reference:
        return f"{text}; vs multivae BaseTrainer: omitted ({reference['skipped']})"
    best = max(RAY_KEYS, key=lambda k: _median(r, k))
    ratio = _median(r, best) / _median(r, "multivae_fp32")
    return (
        f"{text}; best ({best}) / multivae BaseTrainer fp32 = {ratio:.2f} "
        f"(>= {TARGET_BEST_OVER_MULTIVAE})"
    )


def report(results: dict[str, Any]) -> str:
    """The summary table: throughput, ratios to the plain fp32 loop, start-up, validation."""
    lines = []
    peaks = results.get("matmul_gflops", {})
    if peaks:
        lines.append(
            f"\nmatmul ceiling (2048^3, 2 threads): fp32 {peaks['fp32']:.0f} GFLOP/s, "
            f"bf16 {peaks['bf16']:.0f} GFLOP/s"
        )
    for networks, r in results.items():
        if networks == "matmul_gflops":
            continue
        base = r["plain_fp32"]["samples_per_s"]["median"]
        lines.append(
            f"\n{networks} ({r['rows']} tuples, {r['flops_per_sample'] / 1e6:.0f} MFLOP per "
            "sample per step)   samples/s median [min, max]   x plain fp32   start-up s   val/loss"
            "   GFLOP/s (of its precision's matmul)"
        )
        for key in ("plain_fp32", "plain_bf16", "multivae_fp32", *RAY_KEYS):
            s = r.get(key, {"skipped": "not run"})
            if "skipped" in s:
                lines.append(f"  {key:13s} skipped: {s['skipped']}")
                continue
            ratio = s["samples_per_s"]["median"] / base
            startup = f"{s['startup_overhead_s']:10.1f}" if "startup_overhead_s" in s else " " * 10
            val = f"{s['val_loss']:10.2f}" if "val_loss" in s else " " * 10
            gflops = s["samples_per_s"]["median"] * r["flops_per_sample"] / 1e9
            peak = peaks.get("bf16" if key.endswith("bf16") else "fp32")
            share = f" ({gflops / peak:.0%})" if peak else ""
            lines.append(
                f"  {key:13s} {_fmt(s['samples_per_s'])}   {ratio:10.2f}   {startup}   {val}"
                f"   {gflops:6.0f}{share}"
            )
        noise = abs(r["ray_1w_fp32"]["val_loss"] - r["ray_2w_fp32"]["val_loss"])
        gap = abs(r["ray_1w_bf16"]["val_loss"] - r["ray_1w_fp32"]["val_loss"])
        lines.append(f"  bf16 vs fp32 val/loss gap {gap:.3f}; fp32 run-to-run gap {noise:.3f}")
        if "plain_fp32_drift" in r:
            lines.append(
                f"  plain fp32 after the Ray runs / before: {r['plain_fp32_drift']:.2f} "
                "(the machine's drift over the run)"
            )
        if "seeds" in r:
            sd = r["seeds"]
            within = "within" if sd["median_gap"] <= sd["fp32_spread"] else "OUTSIDE"
            lines.append(
                f"  val/loss over {sd['fp32']['n']} seeds, ray 1w: fp32 {sd['fp32']['median']:.2f} "
                f"[{sd['fp32']['min']:.2f}, {sd['fp32']['max']:.2f}], bf16 {sd['bf16']['median']:.2f} "
                f"[{sd['bf16']['min']:.2f}, {sd['bf16']['max']:.2f}]: median gap "
                f"{sd['median_gap']:.2f}, {within} fp32's spread {sd['fp32_spread']:.2f}"
            )
        lines.append(_targets(r))
    return "\n".join(lines)


def main() -> None:
    """Run every measurement and print and save the summary."""
    import ray

    args = _args()
    t0 = time.perf_counter()
    ray.init(num_cpus=4)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (fixed cost, once per process)")
    results: dict[str, Any] = {}
    peaks = {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}
    print(
        f"matmul 2048^3 at 2 threads: fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 "
        f"{peaks['bf16']:.0f} GFLOP/s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="mvtcae-bench-") as storage:
        for networks in args.networks.split(","):
            results[networks] = bench_network(args, networks, Path(storage) / networks)
    ray.shutdown()
    results["matmul_gflops"] = peaks
    text = report(results)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nresults: {args.out}")


if __name__ == "__main__":
    main()
