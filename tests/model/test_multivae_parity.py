"""Same weights, inputs and seed as multivae 1.0.3's MVTCAE give the same numbers.

multivae is the reference, installed without its dependencies (`make install`). Importing it
pulls torchvision, nltk and torchmetrics for datasets and metrics that MVTCAE never touches;
`jobs/multivae_reference.py` satisfies those three with inert placeholders, so that the real
reference code for the loss and the NLL runs unchanged.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mvtcae import MVTCAE, MultimodalBatch, MVTCAEConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def multivae():
    """The reference, imported through the one shim the benchmarks use too."""
    spec = importlib.util.spec_from_file_location(
        "multivae_reference", REPO / "jobs" / "multivae_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.import_multivae()


def _wrap(mv, ours: MVTCAE):
    """multivae-style wrappers around the very same network instances."""

    class Enc(mv.BaseEncoder):
        def __init__(self, net):
            mv.BaseEncoder.__init__(self)
            self.latent_dim, self.net = ours.latent_dim, net

        def forward(self, x):
            mu, logvar = self.net(x)
            return mv.ModelOutput(embedding=mu, log_covariance=logvar)

    class Dec(mv.BaseDecoder):
        def __init__(self, net):
            mv.BaseDecoder.__init__(self)
            self.net = net

        def forward(self, z):
            return mv.ModelOutput(reconstruction=self.net(z))

    return (
        {m: Enc(ours.encoders[m]) for m in ours.modalities},
        {m: Dec(ours.decoders[m]) for m in ours.modalities},
    )


DIMS = {"img": (1, 6, 6), "vec": (5,), "bits": (8,)}
DISTS = {"img": "laplace", "vec": "normal", "bits": "bernoulli"}


def _pair(mv, rescale: bool):
    kwargs = dict(
        n_modalities=3,
        latent_dim=4,
        input_dims=DIMS,
        decoders_dist=DISTS,
        decoder_dist_params={"img": {"scale": 0.75}, "vec": {"scale": 1.5}},
        uses_likelihood_rescaling=rescale,
        alpha=0.6,
        beta=1.8,
    )
    torch.manual_seed(0)
    ours = MVTCAE(MVTCAEConfig(**kwargs, default_networks="conv"))
    encoders, decoders = _wrap(mv, ours)
    ref_cfg = mv.Config(**{**kwargs, "input_dims": {m: s for m, s in DIMS.items()}})
    ref = mv.MVTCAE(ref_cfg, encoders=encoders, decoders=decoders)
    return ours, ref


def _data(n: int = 9):
    g = torch.Generator().manual_seed(3)
    return {
        "img": torch.rand(n, 1, 6, 6, generator=g),
        "vec": torch.randn(n, 5, generator=g),
        "bits": (torch.rand(n, 8, generator=g) > 0.5).float(),
    }


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_loss_and_metrics_match_multivae(multivae, rescale, masked):
    ours, ref = _pair(multivae, rescale)
    data = _data()
    masks = None
    if masked:
        masks = {
            "img": torch.tensor([1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=torch.bool),
            "vec": torch.tensor([1, 0, 1, 1, 1, 0, 1, 0, 1], dtype=torch.bool),
            "bits": torch.tensor([0, 1, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool),
        }
        for m in data:
            data[m][~masks[m]] = 0.0
    ref_inputs = (
        SimpleNamespace(data=data) if masks is None else SimpleNamespace(data=data, masks=masks)
    )
    torch.manual_seed(11)
    expected = ref(ref_inputs)
    torch.manual_seed(11)
    got = ours(MultimodalBatch(data=data, masks=masks))
    torch.testing.assert_close(got.loss, expected.loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss_sum, expected.loss_sum.detach(), rtol=1e-5, atol=1e-4)
    assert set(got.metrics) == set(expected.metrics)
    for key, value in expected.metrics.items():
        torch.testing.assert_close(got.metrics[key], value.detach(), rtol=1e-5, atol=1e-4, msg=key)


def test_joint_nll_matches_multivae(multivae):
    ours, ref = _pair(multivae, rescale=False)
    data = _data(5)
    torch.manual_seed(5)
    expected = ref.compute_joint_nll(SimpleNamespace(data=data), K=300, batch_size_K=64)
    torch.manual_seed(5)
    got = ours.compute_joint_nll(MultimodalBatch(data=data), K=300, batch_size_K=64)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-3)


def test_wrapped_networks_are_shared(multivae):
    ours, ref = _pair(multivae, rescale=False)
    assert isinstance(ref.encoders["img"].net, nn.Module)
    assert ref.encoders["img"].net is ours.encoders["img"]
