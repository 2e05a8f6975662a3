"""Collectives of the worker group: sums and maxima of the epoch's numbers, the step guard's
"all finite" flag, every rank's RNG states for the checkpoint. Each is a no-op in a group of one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mvtcae.storage.checkpoints import capture_rng_state


def all_reduce(values: dict[str, float], device: torch.device, op: str = "sum") -> dict[str, float]:
    """Sum (or max) a dict of floats over the worker group; keys are identical on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(values)
    keys = sorted(values)
    reduce_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, tensor.tolist(), strict=True))


def min_over_workers(flag: torch.Tensor) -> torch.Tensor:
    """MIN all-reduce of a one-element tensor (the step guard's "all finite" flag)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    device = flag.device if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = flag.detach().reshape(1).to(device)
    dist.all_reduce(reduced, op=dist.ReduceOp.MIN)
    return reduced[0]


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's generator states, in rank order (a collective: all ranks call it)."""
    mine = capture_rng_state()
    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    states: list[Any] = [None] * world
    dist.all_gather_object(states, mine)  # in memory between this run's own workers
    return states
