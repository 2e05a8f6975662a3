"""Default encoder/decoder networks and adapters for user-supplied ones."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

HIDDEN = 512


class MLPEncoder(nn.Module):
    """Flatten, Linear 512, ReLU, Linear 512, ReLU, then Linear heads for mu and logvar."""

    def __init__(self, input_shape: tuple[int, ...], latent_dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.body = nn.Sequential(
            nn.Flatten(start_dim=1),
            nn.Linear(math.prod(self.input_shape), hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.mu = nn.Linear(hidden, latent_dim)
        self.logvar = nn.Linear(hidden, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class MLPDecoder(nn.Module):
    """Linear 512, ReLU, Linear to the flattened shape; maps (..., d) to (..., *shape)."""

    def __init__(self, output_shape: tuple[int, ...], latent_dim: int, hidden: int = HIDDEN):
        super().__init__()
        self.output_shape = tuple(output_shape)
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, math.prod(self.output_shape)),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).reshape(*z.shape[:-1], *self.output_shape)


def _halved(size: int) -> int:
    return (size + 1) // 2  # a 3x3 conv with stride 2 and padding 1


class ConvEncoder(nn.Module):
    """Three stride-2 3x3 convolutions (32, 64, 128 channels), then Linear heads for mu, logvar."""

    channels = (32, 64, 128)

    def __init__(self, input_shape: tuple[int, int, int], latent_dim: int):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for out_c in self.channels:
            layers += [nn.Conv2d(c, out_c, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c, h, w = out_c, _halved(h), _halved(w)
        self.body = nn.Sequential(*layers, nn.Flatten(start_dim=1))
        self.mu = nn.Linear(c * h * w, latent_dim)
        self.logvar = nn.Linear(c * h * w, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.mu(h), self.logvar(h)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: Linear, then stride-2 transposed convolutions to (C, H, W)."""

    def __init__(self, output_shape: tuple[int, int, int], latent_dim: int):
        super().__init__()
        self.output_shape = tuple(output_shape)
        c, h, w = output_shape
        sizes = [(h, w)]
        for _ in ConvEncoder.channels:
            sizes.append((_halved(sizes[-1][0]), _halved(sizes[-1][1])))
        chans = [c, *ConvEncoder.channels]
        self.start = (chans[-1], *sizes[-1])
        self.project = nn.Sequential(
            nn.Linear(latent_dim, math.prod(self.start)), nn.ReLU(inplace=True)
        )
        layers: list[nn.Module] = []
        for i in range(len(ConvEncoder.channels), 0, -1):
            (hi, wi), (ho, wo) = sizes[i], sizes[i - 1]
            pad = (ho - 2 * hi + 1, wo - 2 * wi + 1)  # output_padding that lands on (ho, wo)
            layers.append(
                nn.ConvTranspose2d(
                    chans[i], chans[i - 1], 3, stride=2, padding=1, output_padding=pad
                )
            )
            if i > 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        lead = z.shape[:-1]
        h = self.project(z.reshape(-1, z.shape[-1])).reshape(-1, *self.start)
        return self.body(h).reshape(*lead, *self.output_shape)


DEFAULT_DECODERS = (MLPDecoder, ConvDecoder)


def default_encoder(shape: tuple[int, ...], latent_dim: int, family: str) -> nn.Module:
    """The default encoder for a modality of the given shape."""
    if family == "conv" and len(shape) == 3:
        return ConvEncoder(shape, latent_dim)  # type: ignore[arg-type]
    return MLPEncoder(shape, latent_dim)


def default_decoder(shape: tuple[int, ...], latent_dim: int, family: str) -> nn.Module:
    """The default decoder for a modality of the given shape."""
    if family == "conv" and len(shape) == 3:
        return ConvDecoder(shape, latent_dim)  # type: ignore[arg-type]
    return MLPDecoder(shape, latent_dim)


def gaussian_params(output: Any, modality: str) -> tuple[Tensor, Tensor]:
    """(mu, logvar) from an encoder's output: a pair, or pythae-style embedding/log_covariance."""
    if isinstance(output, tuple | list) and len(output) == 2:
        return output[0], output[1]
    if isinstance(output, Mapping) and "embedding" in output:
        return output["embedding"], output["log_covariance"]
    if hasattr(output, "embedding") and hasattr(output, "log_covariance"):
        return output.embedding, output.log_covariance
    raise TypeError(
        f"encoder of modality {modality!r} returned {type(output).__name__}; expected "
        "(mu, logvar) or an object with .embedding and .log_covariance"
    )


def decoder_tensor(output: Any, modality: str) -> Tensor:
    """The decoder's output tensor: a tensor, or pythae-style ``.reconstruction``."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "reconstruction" in output:
        return output["reconstruction"]
    if hasattr(output, "reconstruction"):
        return output.reconstruction
    raise TypeError(
        f"decoder of modality {modality!r} returned {type(output).__name__}; expected a tensor "
        "or an object with .reconstruction"
    )
