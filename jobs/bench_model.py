"""Benchmark of the MVTCAE model: loss step throughput and the vectorised joint NLL.

Measures, side by side in one run (variants interleaved within each repeat, so that machine
load hits them alike):
  * the machine's own matmul throughput, fp32 and bf16 (the hardware ceiling);
  * forward+backward samples/s of the loss on a PolyMNIST-sized model (5 x 3x28x28, latent
    512), default MLP and conv networks, fp32 and bf16 autocast;
  * ``compute_joint_nll`` at K=1000, vectorised, against a straightforward per-row loop of the
    same estimator (same seed, same value), as time and achieved GFLOP/s.

Run: ``python jobs/bench_model.py`` (``--help`` for options). Prints median and spread
(min-max) over repeats and, with ``--json``, writes the figures to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig

MODALITIES = {f"m{i}": (3, 28, 28) for i in range(5)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed repeats per variant")
    p.add_argument("--batch-size", type=int, default=256, help="rows per loss step")
    p.add_argument("--steps", type=int, default=3, help="loss steps per timed repeat")
    p.add_argument("--nll-rows", type=int, default=8, help="rows whose joint NLL is estimated")
    p.add_argument("--K", type=int, default=1000, help="importance samples per row")
    p.add_argument("--batch-size-K", type=int, default=100, help="samples per vectorised step")
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n x n matmul")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the results to this JSON file")
    return p.parse_args()


def build_model(networks: str, device: str) -> MVTCAE:
    torch.manual_seed(0)
    cfg = MVTCAEConfig(
        n_modalities=len(MODALITIES),
        latent_dim=512,
        input_dims=MODALITIES,
        decoders_dist={m: "laplace" for m in MODALITIES},
        decoder_dist_params={m: {"scale": 0.75} for m in MODALITIES},
        alpha=5 / 6,
        beta=2.5,
        default_networks=networks,
    )
    return MVTCAE(cfg).to(device)


def random_batch(n: int, device: str) -> MultimodalBatch:
    g = torch.Generator().manual_seed(1)
    return MultimodalBatch(
        data={m: torch.rand(n, *s, generator=g).to(device) for m, s in MODALITIES.items()}
    )


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def per_row_joint_nll(model: MVTCAE, batch: MultimodalBatch, K: int, batch_size_K: int) -> float:
    """The same estimator as ``compute_joint_nll``, looping over rows as multivae does."""
    with torch.no_grad():
        mu, logvar = model.joint_posterior(batch)
        sigma = torch.exp(0.5 * logvar)
        z_all = (mu + mu.new_empty((K, *mu.shape)).normal_() * sigma).transpose(0, 1)
        total = 0.0
        for i in range(len(batch)):
            chunks = []
            for k in range(0, K, batch_size_K):
                z = z_all[i, k : k + batch_size_K]
                lpx = 0.0
                for m in model.modalities:
                    out = model.decoders[m](z)
                    scale = model.model_config.scale(m)
                    lp = torch.distributions.Laplace(out, scale).log_prob(batch.data[m][i])
                    lpx = lpx + lp.reshape(len(z), -1).sum(-1)
                lpz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                lqz = torch.distributions.Normal(mu[i], sigma[i]).log_prob(z).sum(-1)
                chunks.append(torch.logsumexp(lpx + lpz - lqz, 0))
            total += (torch.logsumexp(torch.stack(chunks), 0) - math.log(K)).item()
        return -total


def summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def main() -> None:
    args = parse_args()
    dev = args.device
    torch.manual_seed(0)
    n = args.matmul_size
    mats = {
        dt: (torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt))
        for dt in (torch.float32, torch.bfloat16)
    }

    variants: dict[str, tuple[Callable[[], object], float]] = {}  # name -> (fn, flops per call)
    for dt, (a, b) in mats.items():
        name = f"matmul {str(dt).removeprefix('torch.')}"
        variants[name] = ((lambda a=a, b=b: a @ b), 2.0 * n**3)

    batch = random_batch(args.batch_size, dev)
    models = {net: build_model(net, dev) for net in ("mlp", "conv")}
    for net, model in models.items():
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for precision in ("fp32", "bf16"):
            ctx = (
                (lambda: torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16))
                if precision == "bf16"
                else nullcontext
            )

            def step(model=model, opt=opt, ctx=ctx) -> None:
                for _ in range(args.steps):
                    opt.zero_grad(set_to_none=True)
                    with ctx():
                        loss = model(batch).loss
                    loss.backward()
                    opt.step()

            flops = count_flops(lambda model=model, ctx=ctx: _one_step(model, batch, ctx))
            variants[f"loss fwd+bwd {net} {precision}"] = (step, flops * args.steps)

    mlp = models["mlp"].eval()
    nll_batch = random_batch(args.nll_rows, dev)
    nll_flops = count_flops(
        lambda: mlp.compute_joint_nll(nll_batch, K=args.K, batch_size_K=args.batch_size_K)
    )
    variants["joint NLL vectorised"] = (
        lambda: mlp.compute_joint_nll(nll_batch, K=args.K, batch_size_K=args.batch_size_K),
        nll_flops,
    )
    variants["joint NLL per-row loop"] = (
        lambda: per_row_joint_nll(mlp, nll_batch, args.K, args.batch_size_K),
        nll_flops,
    )

    torch.manual_seed(3)
    fast = mlp.compute_joint_nll(nll_batch, K=args.K, batch_size_K=args.batch_size_K).item()
    torch.manual_seed(3)
    slow = per_row_joint_nll(mlp, nll_batch, args.K, args.batch_size_K)

    for fn, _ in variants.values():  # warm-up
        fn()
        sync(dev)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for name, (fn, _) in variants.items():
            sync(dev)
            start = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - start)

    results = report(args, variants, times, fast, slow)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def _one_step(model: MVTCAE, batch: MultimodalBatch, ctx: Callable) -> None:
    with ctx():
        loss = model(batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)


def report(args, variants, times, fast: float, slow: float) -> dict:
    peak32 = statistics.median(variants["matmul float32"][1] / t for t in times["matmul float32"])
    rows, results = [], {"device": args.device, "threads": torch.get_num_threads(), "variants": {}}
    for name, (_, flops) in variants.items():
        gflops = [flops / t / 1e9 for t in times[name]]
        entry = {"seconds": summary(times[name]), "gflops": summary(gflops)}
        if name.startswith("loss"):
            sps = [args.batch_size * args.steps / t for t in times[name]]
            entry["samples_per_s"] = summary(sps)
        entry["fraction_of_fp32_matmul"] = statistics.median(gflops) / (peak32 / 1e9)
        results["variants"][name] = entry
        rows.append((name, entry))
    speedup = [
        s / f
        for s, f in zip(times["joint NLL per-row loop"], times["joint NLL vectorised"], strict=True)
    ]
    results["nll_speedup_vectorised_over_loop"] = summary(speedup)
    results["nll_values"] = {
        "vectorised": fast,
        "per_row_loop": slow,
        "rel_diff": abs(fast - slow) / abs(slow),
    }

    print(
        f"\ndevice={args.device} threads={torch.get_num_threads()} repeats={args.repeats} "
        f"batch={args.batch_size} K={args.K} batch_size_K={args.batch_size_K} nll_rows={args.nll_rows}"
    )
    print(
        f"{'variant':32s} {'median s':>10s} {'min-max s':>17s} {'GFLOP/s':>9s} {'% fp32 mm':>9s} {'samples/s':>10s}"
    )
    for name, e in rows:
        s, g = e["seconds"], e["gflops"]
        sps = f"{e['samples_per_s']['median']:10.0f}" if "samples_per_s" in e else " " * 10
        print(
            f"{name:32s} {s['median']:10.4f} {s['min']:8.4f}-{s['max']:<8.4f} {g['median']:9.1f} "
            f"{100 * e['fraction_of_fp32_matmul']:8.0f}% {sps}"
        )
    sp = results["nll_speedup_vectorised_over_loop"]
    print(
        f"\njoint NLL: vectorised {sp['median']:.2f}x faster than the per-row loop "
        f"(min {sp['min']:.2f}, max {sp['max']:.2f}); values {fast:.4f} vs {slow:.4f} "
        f"(rel diff {results['nll_values']['rel_diff']:.1e})"
    )
    frac = results["variants"]["joint NLL vectorised"]["fraction_of_fp32_matmul"]
    print(
        f"vectorised NLL at {100 * frac:.0f}% of this run's fp32 matmul throughput (target >= 70%)"
    )
    return results


if __name__ == "__main__":
    main()
