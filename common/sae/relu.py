"""Vanilla ReLU SAE with an L1 penalty (Cunningham et al., ICLR 2024; Bricken et al., 2023).

    z     = ReLU(W_enc^T (x - b_dec) + b_enc)
    x_hat = W_dec^T z + b_dec
    L     = ||x - x_hat||^2 + lambda(t) * sum_i |z_i| * (||W_dec[i]|| if decoder_norm_l1 else 1)

Options:
* ``tied``: the decoder is the encoder transpose (Cunningham et al.: c = ReLU(Mx + b),
  x_hat = M^T c).
* ``unit_norm_decoder``: rows of W_dec are renormalised to unit norm after every step, so the L1
  term cannot be cheated by growing the dictionary. The alternative, ``decoder_norm_l1``, weights
  each latent's L1 by its decoder-row norm (Anthropic's April 2024 update) and leaves norms free.
* ``l1_warmup_steps``: lambda rises linearly from 0 to ``l1_coefficient``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.sae.base import (
    LossOutput,
    SAEConfig,
    TrainContext,
    UnitNormDecoderSAE,
    fvu,
    reconstruction_mse,
    unit_norm_rows_,
)
from common.sae.registry import register


@dataclass
class ReluConfig(SAEConfig):
    l1_coefficient: float = 1e-3
    l1_warmup_steps: int = 0
    tied: bool = False
    unit_norm_decoder: bool = True
    decoder_norm_l1: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coefficient < 0:
            raise ValueError(f"`l1_coefficient` must be >= 0, got {self.l1_coefficient}")
        if self.unit_norm_decoder and self.decoder_norm_l1:
            raise ValueError("choose one of `unit_norm_decoder` and `decoder_norm_l1`, not both")


def l1_schedule(coefficient: float, warmup_steps: int, step: int) -> float:
    """Linear warm-up of a sparsity coefficient: lambda(t) = lambda * min(1, t / warmup)."""
    if warmup_steps <= 0:
        return coefficient
    return coefficient * min(1.0, step / warmup_steps)


@register
class ReluSAE(UnitNormDecoderSAE):
    name = "relu"
    config_class = ReluConfig
    cfg: ReluConfig

    def __init__(self, cfg: ReluConfig) -> None:
        super().__init__(cfg)
        w = torch.randn(cfg.d_sae, cfg.d_in)
        unit_norm_rows_(w)
        # Encoder = decoder^T, scaled so that the initial reconstruction has roughly the input's
        # scale (about d_sae/2 latents fire at init); tied weights cannot be scaled.
        scale = 1.0 if cfg.tied else min(1.0, 2 * cfg.d_in / cfg.d_sae)
        self.W_enc = nn.Parameter(w.t().clone() * scale)
        if not cfg.tied:
            self.W_dec = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @property
    def decoder_weight(self) -> Tensor:
        return self.W_enc.t() if self.cfg.tied else self.W_dec

    @property
    def decoder_directions(self) -> Tensor:
        return self.decoder_weight

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu(self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.decoder_weight + self.b_dec

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        ctx = ctx or TrainContext()
        z = self.encode(x)
        x_hat = self.decode(z)
        mse = reconstruction_mse(x, x_hat)
        if self.cfg.decoder_norm_l1:
            l1 = (z * self.decoder_weight.norm(dim=1)).sum(-1).mean()
        else:
            l1 = z.sum(-1).mean()  # z >= 0, so |z| = z
        lam = l1_schedule(self.cfg.l1_coefficient, self.cfg.l1_warmup_steps, ctx.step)
        loss = mse + lam * l1
        terms = {
            "mse": mse.item(),
            "l1": l1.item(),
            "l1_coefficient": lam,
            "fvu": fvu(x, x_hat).item(),
        }
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)

    def unit_norm_decoder(self) -> nn.Parameter | None:
        # Tied: the decoder rows are columns of W_enc, whose gradient also carries the encoder's,
        # so they are only renormalised (below), not given a tangent gradient.
        return self.W_dec if self.cfg.unit_norm_decoder and not self.cfg.tied else None

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.unit_norm_decoder and self.cfg.tied:
            unit_norm_rows_(self.W_enc.data.T)  # a view: rows of M are columns of W_enc
        else:
            super().after_step()
