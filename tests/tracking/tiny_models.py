"""Tiny real MVTCAE models for the tracking tests."""

from __future__ import annotations

import torch

from mvtcae import MVTCAE, MVTCAEConfig


def tiny_model(seed: int = 0) -> MVTCAE:
    """A small two-modality MVTCAE: a 1x8x8 image (laplace) and a 5-vector (bernoulli)."""
    torch.manual_seed(seed)
    cfg = MVTCAEConfig(
        n_modalities=2,
        latent_dim=4,
        input_dims={"img": (1, 8, 8), "vec": (5,)},
        decoders_dist={"img": "laplace", "vec": "bernoulli"},
        decoder_dist_params={"img": {"scale": 0.75}},
    )
    return MVTCAE(cfg).eval()
