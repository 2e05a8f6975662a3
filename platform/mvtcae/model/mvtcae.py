"""MVTCAE (Hwang et al., NeurIPS 2021) in plain PyTorch, with multivae's public API.

One module, over 400 lines: the class is the public surface multivae's users move over to
(forward, encode, predict, compute_joint_nll, save and load), kept in one place as there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .batch import MultimodalBatch, as_batch
from .gaussian import (
    kl_between,
    kl_to_standard_normal,
    log_normal,
    log_standard_normal,
    product_of_experts,
)
from .likelihoods import make_log_prob
from .model_config import ConfigError, MVTCAEConfig
from .networks import (
    DEFAULT_DECODERS,
    decoder_tensor,
    default_decoder,
    default_encoder,
    gaussian_params,
)
from .output import ModelOutput
from .persistence import read_model_dir, write_model_dir


class MVTCAE(nn.Module):
    """Multi-View Total Correlation Auto-Encoder with a product-of-experts joint posterior.

    ``encoders``/``decoders`` map modality names to modules; when omitted, default networks
    are built from ``model_config.input_dims``.
    """

    model_name = "MVTCAE"

    def __init__(
        self,
        model_config: MVTCAEConfig,
        encoders: dict[str, nn.Module] | None = None,
        decoders: dict[str, nn.Module] | None = None,
    ):
        super().__init__()
        self.model_config = model_config
        self.modalities = _modality_names(model_config, encoders, decoders)
        self.encoders = nn.ModuleDict(
            encoders if encoders is not None else self._default_networks(default_encoder)
        )
        self.decoders = nn.ModuleDict(
            decoders if decoders is not None else self._default_networks(default_decoder)
        )
        custom = [p for p, given in (("encoders", encoders), ("decoders", decoders)) if given]
        model_config.custom_architectures = custom
        _check_networks(model_config, self.modalities, self.encoders, self.decoders)
        self.n_modalities = model_config.n_modalities
        self.latent_dim = model_config.latent_dim
        self.alpha = model_config.alpha
        self.beta = model_config.beta
        self.rescale_factors = model_config.resolved_rescale_factors(self.modalities)
        self.log_probs = {
            m: make_log_prob(model_config.distribution(m), model_config.scale(m))
            for m in self.modalities
        }

    def _default_networks(self, build: Any) -> dict[str, nn.Module]:
        cfg = self.model_config
        if cfg.input_dims is None:
            raise ConfigError("input_dims is required when encoders or decoders are not given")
        return {
            m: build(cfg.input_dims[m], cfg.latent_dim, cfg.default_networks)
            for m in self.modalities
        }

    # -- posterior -------------------------------------------------------------------------
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _experts(
        self, batch: MultimodalBatch, mods: Sequence[str]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Stacked (E, n, d) means and log-variances of the given modalities, and presence."""
        dtype = self._dtype()
        mus, logvars = [], []
        for m in mods:
            x = batch.data[m]
            if x.is_floating_point() and x.dtype != dtype:
                x = x.to(dtype)
            mu, logvar = gaussian_params(self.encoders[m](x), m)
            mus.append(mu.to(dtype))
            logvars.append(logvar.to(dtype))
        return torch.stack(mus), torch.stack(logvars), _presence(batch, mods)

    def experts(
        self, inputs: Any, cond_mod: str | Sequence[str] = "all"
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The unimodal posteriors that `joint_posterior` multiplies: (E, n, d) means and
        log-variances of ``cond_mod`` in order, and their bool (E, n) presence (None: all
        present). Combine any subset of them with `mvtcae.model.gaussian.product_of_experts`."""
        batch = as_batch(inputs)
        return self._experts(batch, self._cond_modalities(cond_mod, batch))

    def joint_posterior(
        self, inputs: Any, cond_mod: str | Sequence[str] = "all"
    ) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of the product of experts over ``cond_mod``, each (n, d)."""
        return product_of_experts(*self.experts(inputs, cond_mod))

    def _cond_modalities(self, cond_mod: Any, batch: MultimodalBatch) -> list[str]:
        if cond_mod == "all":
            mods = [m for m in self.modalities if m in batch.data]
        elif isinstance(cond_mod, str):
            mods = [cond_mod]
        elif (
            isinstance(cond_mod, list | tuple)
            and cond_mod
            and all(isinstance(m, str) for m in cond_mod)
        ):
            mods = list(cond_mod)
        else:
            raise ValueError(
                f"cond_mod must be 'all', a modality name or a non-empty list of names, "
                f"got {cond_mod!r}"
            )
        unknown = [m for m in mods if m not in self.modalities]
        if unknown:
            raise ValueError(
                f"cond_mod names unknown modalities {unknown}; known: {self.modalities}"
            )
        absent = [m for m in mods if m not in batch.data]
        if absent:
            raise ValueError(f"cond_mod asks for modalities {absent} that the batch does not carry")
        if not mods:
            raise ValueError("the batch carries none of the model's modalities")
        return mods

    # -- loss ------------------------------------------------------------------------------
    def forward(self, inputs: Any, **kwargs: Any) -> ModelOutput:
        """The MVTCAE loss (mean over rows), its batch sum and its detached terms."""
        batch = as_batch(inputs)
        n = len(batch)
        mods = self._cond_modalities("all", batch)
        mus, logvars, present = self._experts(batch, mods)
        joint_mu, joint_logvar = product_of_experts(mus, logvars, present)
        eps = torch.empty_like(joint_mu).normal_()
        z = joint_mu + eps * torch.exp(0.5 * joint_logvar)

        metrics: dict[str, Tensor] = {}
        joint_kld = kl_to_standard_normal(joint_mu, joint_logvar).sum()
        metrics["joint_divergence"] = joint_kld
        zero = joint_kld.new_zeros(())
        loss_rec, kld_total = zero, zero
        for i, m in enumerate(mods):
            row_present = None if present is None else present[i]
            rec = self._reconstruction_nll(m, z, batch.data[m]) * self.rescale_factors[m]
            mu_m, logvar_m = mus[i], logvars[i]
            if row_present is not None:
                # Finite stand-ins before the KL, so that neither value nor gradient is NaN.
                keep = row_present.unsqueeze(-1)
                mu_m = torch.where(keep, mu_m, joint_mu.detach())
                logvar_m = torch.where(keep, logvar_m, joint_logvar.detach())
            kld = kl_between(joint_mu, joint_logvar, mu_m, logvar_m)
            if row_present is not None:
                rec = torch.where(row_present, rec, 0.0)
                kld = torch.where(row_present, kld, 0.0)
            metrics[m] = rec.sum()
            metrics["kld_" + m] = kld.sum()
            loss_rec = loss_rec + metrics[m]
            kld_total = kld_total + metrics["kld_" + m]
        for m in self.modalities:  # modalities the batch does not carry contribute nothing
            metrics.setdefault(m, zero)
            metrics.setdefault("kld_" + m, zero)

        M = self.n_modalities
        kld_weighted = (self.alpha / M) * kld_total + (1 - self.alpha) * joint_kld
        loss_sum = ((M - self.alpha) / M) * loss_rec + self.beta * kld_weighted
        return ModelOutput(
            loss=loss_sum / n,
            loss_sum=loss_sum,
            metrics={k: v.detach() for k, v in metrics.items()},
        )

    def _decode_one(self, m: str, z: Tensor) -> Tensor:
        """Decoder m applied to z of shape (..., d); output (..., *shape_m) in the model dtype."""
        lead = z.shape[:-1]
        out = decoder_tensor(self.decoders[m](z.reshape(-1, z.shape[-1])), m)
        return out.reshape(*lead, *out.shape[1:]).to(z.dtype)

    def _reconstruction_nll(self, m: str, z: Tensor, x: Tensor) -> Tensor:
        """−log p(x_m | z) summed over the event dims: z (..., d) gives (...,).

        ``x`` of shape (n, *shape_m) broadcasts against z's leading dims, e.g. (k, n, d).
        """
        out = self._decode_one(m, z)
        target = x.to(out.dtype) if x.is_floating_point() else x
        # Default decoders return fresh tensors, which may be overwritten when no grad is kept.
        inplace = not torch.is_grad_enabled() and isinstance(self.decoders[m], DEFAULT_DECODERS)
        return -self.log_probs[m](out, target, z.dim() - 1, inplace=inplace)

    # -- inference and generation ----------------------------------------------------------
    def encode(
        self,
        inputs: Any,
        cond_mod: str | Sequence[str] = "all",
        N: int = 1,
        return_mean: bool = False,
        flatten: bool = False,
        **kwargs: Any,
    ) -> ModelOutput:
        """Latents from the joint posterior of ``cond_mod``: z is (n, d), or (n, N, d) for N > 1.

        Unlike multivae, whose samples are (N, n, d), samples are batch first. ``flatten=True``
        with N > 1 gives (n * N, d), rows of a sample consecutive.
        """
        if not isinstance(N, int) or N < 1:
            raise ValueError(f"N must be a positive integer, got {N!r}")
        mu, logvar = self.joint_posterior(inputs, cond_mod)
        if return_mean:
            z = mu if N == 1 else mu.unsqueeze(1).expand(-1, N, -1)
        elif N == 1:
            z = mu + torch.empty_like(mu).normal_() * torch.exp(0.5 * logvar)
        else:
            eps = mu.new_empty((N, *mu.shape)).normal_()  # drawn (N, n, d), as multivae
            z = (mu + eps * torch.exp(0.5 * logvar)).transpose(0, 1)
        if N > 1 and flatten:
            z = z.reshape(-1, z.shape[-1])
        return ModelOutput(z=z, one_latent_space=True)

    def decode(
        self, z: Tensor | ModelOutput, modalities: str | Sequence[str] = "all"
    ) -> ModelOutput:
        """Decoder outputs {m: (..., *shape_m)} for latents z of shape (..., d)."""
        if not isinstance(z, Tensor):
            z = z.z
        if modalities == "all":
            modalities = self.modalities
        elif isinstance(modalities, str):
            modalities = [modalities]
        unknown = [m for m in modalities if m not in self.modalities]
        if unknown:
            raise ValueError(
                f"cannot decode unknown modalities {unknown}; known: {self.modalities}"
            )
        z = z.to(self._dtype())
        return ModelOutput({m: self._decode_one(m, z) for m in modalities})

    def predict(
        self,
        inputs: Any,
        cond_mod: str | Sequence[str] = "all",
        gen_mod: str | Sequence[str] = "all",
        N: int = 1,
        return_mean: bool = False,
        flatten: bool = False,
        **kwargs: Any,
    ) -> ModelOutput:
        """Generate ``gen_mod`` from the posterior of ``cond_mod`` (reconstruction when equal)."""
        z = self.encode(inputs, cond_mod, N=N, return_mean=return_mean, flatten=flatten)
        return self.decode(z, gen_mod)

    def generate_from_prior(self, n_samples: int, **kwargs: Any) -> ModelOutput:
        """z of shape (n_samples, d) from N(0, I); always with a batch dimension."""
        if not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
        param = next(self.parameters())
        z = torch.randn(n_samples, self.latent_dim, dtype=param.dtype, device=param.device)
        return ModelOutput(z=z, one_latent_space=True)

    # -- likelihood ------------------------------------------------------------------------
    @torch.no_grad()
    def compute_joint_nll(
        self,
        inputs: Any,
        K: int = 1000,
        batch_size_K: int = 100,
        proposal: str | Sequence[str] = "all",
    ) -> Tensor:
        """−Σ_i log p(X_i), importance-weighted with a posterior of the model as proposal.

        ``proposal`` names the modalities whose product of experts proposes z (default: every
        modality, the joint posterior; a subset gives MoPoE's subset estimates of the same
        likelihood). Vectorised over rows and samples, ``batch_size_K`` samples per step. With
        masks, each row's estimate covers its observed modalities, proposed from their present
        experts; every row needs one proposal modality present.
        """
        if K < 1 or batch_size_K < 1:
            raise ValueError(
                f"K and batch_size_K must be >= 1, got K={K}, batch_size_K={batch_size_K}"
            )
        was_training = self.training
        self.eval()
        try:
            batch = as_batch(inputs)
            mods = self._cond_modalities("all", batch)
            mus, logvars, present = self._experts(batch, mods)
            mu, logvar = self._proposal(batch, mods, mus, logvars, present, proposal)
            std = torch.exp(0.5 * logvar)
            eps = mu.new_empty((K, *mu.shape)).normal_()  # one (K, n, d) draw, as multivae
            log_w = torch.cat(
                [
                    self._log_weights(
                        batch, mods, present, mu, logvar, mu + eps[k : k + batch_size_K] * std
                    )
                    for k in range(0, K, batch_size_K)
                ]
            )
            log_px = torch.logsumexp(log_w, dim=0) - math.log(K)
            return -log_px.sum()
        finally:
            self.train(was_training)

    def _proposal(
        self,
        batch: MultimodalBatch,
        mods: Sequence[str],
        mus: Tensor,
        logvars: Tensor,
        present: Tensor | None,
        proposal: str | Sequence[str],
    ) -> tuple[Tensor, Tensor]:
        """(mu, logvar) of the product of experts of the ``proposal`` modalities."""
        if proposal == "all":
            return product_of_experts(mus, logvars, present)
        chosen = [mods.index(m) for m in self._cond_modalities(proposal, batch)]
        sub_present = None if present is None else present[chosen]
        if sub_present is not None and not bool(sub_present.any(dim=0).all()):
            empty = int((~sub_present.any(dim=0)).sum())
            raise ValueError(
                f"{empty} rows have none of the proposal modalities {list(proposal)} present"
            )
        return product_of_experts(mus[chosen], logvars[chosen], sub_present)

    def _log_weights(
        self,
        batch: MultimodalBatch,
        mods: Sequence[str],
        present: Tensor | None,
        mu: Tensor,
        logvar: Tensor,
        z: Tensor,
    ) -> Tensor:
        """log p(X|z) + log p(z) − log q(z|X) for z of shape (k, n, d): returns (k, n)."""
        log_w = log_standard_normal(z) - log_normal(z, mu, logvar)
        for i, m in enumerate(mods):
            lp = -self._reconstruction_nll(m, z, batch.data[m])
            log_w = log_w + (lp if present is None else torch.where(present[i], lp, 0.0))
        return log_w

    # -- persistence -----------------------------------------------------------------------
    def save(self, dir_path: str) -> None:
        """Write ``model_config.json`` and ``model.safetensors`` (no pickle) into ``dir_path``."""
        write_model_dir(self, dir_path)

    @classmethod
    def load(
        cls,
        dir_path: str,
        encoders: dict[str, nn.Module] | None = None,
        decoders: dict[str, nn.Module] | None = None,
        map_location: str | torch.device = "cpu",
        trusted_modules: Iterable[str] | None = None,
    ) -> MVTCAE:
        """Rebuild a model saved with :meth:`save`.

        Custom networks not passed in are rebuilt from their recorded import path, but only
        ``nn.Module`` subclasses from ``mvtcae`` or from ``trusted_modules`` (module names,
        each covering its submodules); anything else raises `UntrustedModuleError` unimported.
        """
        return read_model_dir(cls, dir_path, encoders, decoders, map_location, trusted_modules)

    load_from_folder = load  # multivae's name


def _presence(batch: MultimodalBatch, mods: Sequence[str]) -> Tensor | None:
    """Bool (E, n) presence of each modality, or None when every row has all of them."""
    masks = batch.masks or {}
    if not any(m in masks for m in mods):
        return None
    n = len(batch)
    device = batch.data[mods[0]].device
    present = torch.stack(
        [
            masks[m].to(device=device, dtype=torch.bool)
            if m in masks
            else torch.ones(n, dtype=torch.bool, device=device)
            for m in mods
        ]
    )
    empty = int((~present.any(dim=0)).sum())
    if empty:
        raise ValueError(
            f"{empty} of {n} rows have none of the modalities {list(mods)} present: "
            "every row needs at least one observed modality"
        )
    return present


def _modality_names(
    cfg: MVTCAEConfig, encoders: dict[str, nn.Module] | None, decoders: dict[str, nn.Module] | None
) -> list[str]:
    if cfg.input_dims is not None:
        return list(cfg.input_dims)
    if encoders is not None:
        return list(encoders)
    if decoders is not None:
        return list(decoders)
    raise ConfigError("input_dims is required when encoders and decoders are not given")


def _check_networks(
    cfg: MVTCAEConfig, modalities: list[str], encoders: nn.ModuleDict, decoders: nn.ModuleDict
) -> None:
    if len(modalities) != cfg.n_modalities:
        raise ConfigError(
            f"n_modalities is {cfg.n_modalities} but the model has {len(modalities)} "
            f"modalities {modalities}"
        )
    for part, nets in (("encoders", encoders), ("decoders", decoders)):
        if set(nets) != set(modalities):
            raise ConfigError(
                f"{part} are given for {sorted(nets)} but the modalities are {sorted(modalities)}"
            )
    for field_name in ("decoders_dist", "decoder_dist_params", "rescale_factors"):
        for m in getattr(cfg, field_name) or {}:
            if m not in modalities:
                raise ConfigError(
                    f"{field_name}: {m!r} is not a modality; modalities: {modalities}"
                )
