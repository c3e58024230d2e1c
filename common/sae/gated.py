"""Gated SAE (paper 2: Rajamanoharan et al., "Improving Dictionary Learning with Gated SAEs", 2024).

The L1 penalty of a ReLU SAE shrinks every activation towards zero. A gated SAE separates *which*
latents fire (the gate, which carries the L1 penalty) from *how strongly* (the magnitude path,
which carries none):

    pi_gate = W_gate^T (x - b_dec) + b_gate
    pi_mag  = W_mag^T  (x - b_dec) + b_mag,      W_mag[:, i] = exp(r_mag[i]) * W_gate[:, i]
    f       = 1[pi_gate > 0] * ReLU(pi_mag)
    x_hat   = W_dec^T f + b_dec
    L       = ||x - x_hat||^2
              + lambda(t) * sum_i ReLU(pi_gate)_i * (||W_dec[i]|| if decoder_norm_l1 else 1)
              + ||x - (sg(W_dec)^T ReLU(pi_gate) + sg(b_dec))||^2

``sg`` is stop-gradient: the auxiliary reconstruction (the "frozen decoder" term) trains the gate
path only, since the Heaviside step passes no gradient to it. Parameter names and shapes match
SAELens's ``GatedSAE`` (``W_enc`` is W_gate with shape ``(d_in, d_sae)``, ``b_gate``, ``r_mag``,
``b_mag``, ``W_dec`` ``(d_sae, d_in)``, ``b_dec``), so export is a one-to-one copy with
``apply_b_dec_to_input=True``.

Decoder norms: as in ``relu.py``, either ``unit_norm_decoder`` (the paper's choice: rows
renormalised after every step) or ``decoder_norm_l1`` (the gate's L1 weighted by row norms, as in
SAELens), not both.
"""

from __future__ import annotations

import math
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
from common.sae.relu import l1_schedule


@dataclass
class GatedConfig(SAEConfig):
    l1_coefficient: float = 1e-3
    l1_warmup_steps: int = 0
    unit_norm_decoder: bool = True
    decoder_norm_l1: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.l1_coefficient >= 0 and math.isfinite(self.l1_coefficient)):
            raise ValueError(
                f"`l1_coefficient` must be a finite number >= 0, got {self.l1_coefficient}"
            )
        if self.l1_warmup_steps < 0:
            raise ValueError(f"`l1_warmup_steps` must be >= 0, got {self.l1_warmup_steps}")
        if self.unit_norm_decoder and self.decoder_norm_l1:
            raise ValueError("choose one of `unit_norm_decoder` and `decoder_norm_l1`, not both")


@register
class GatedSAE(UnitNormDecoderSAE):
    name = "gated"
    config_class = GatedConfig
    cfg: GatedConfig

    def __init__(self, cfg: GatedConfig) -> None:
        super().__init__(cfg)
        w = torch.randn(cfg.d_sae, cfg.d_in)
        unit_norm_rows_(w)
        self.W_enc = nn.Parameter(w.t().clone())  # W_gate
        self.W_dec = nn.Parameter(w.clone())
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def gate_pre_activations(self, x: Tensor) -> Tensor:
        """pi_gate = W_gate^T (x - b_dec) + b_gate."""
        return (x - self.b_dec) @ self.W_enc + self.b_gate

    def magnitude_pre_activations(self, x: Tensor) -> Tensor:
        """pi_mag = (exp(r_mag) * W_gate)^T (x - b_dec) + b_mag."""
        return (x - self.b_dec) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pi_gate = self.gate_pre_activations(x)
        z = (pi_gate > 0).to(x.dtype) * torch.relu(self.magnitude_pre_activations(x))
        return z, pi_gate

    def encode(self, x: Tensor) -> Tensor:
        """f = 1[pi_gate > 0] * ReLU(pi_mag)."""
        return self._encode(x)[0]

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        ctx = ctx or TrainContext()
        z, pi_gate = self._encode(x)
        x_hat = self.decode(z)
        mse = reconstruction_mse(x, x_hat)
        gate = torch.relu(pi_gate)
        if self.cfg.decoder_norm_l1:
            l1 = (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            l1 = gate.sum(-1).mean()
        x_hat_frozen = gate @ self.W_dec.detach() + self.b_dec.detach()
        aux = reconstruction_mse(x, x_hat_frozen)
        lam = l1_schedule(self.cfg.l1_coefficient, self.cfg.l1_warmup_steps, ctx.step)
        loss = mse + lam * l1 + aux
        terms = {
            "mse": mse.item(),
            "l1": l1.item(),
            "aux_mse": aux.item(),
            "l1_coefficient": lam,
            "fvu": fvu(x, x_hat).item(),
        }
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)

    def unit_norm_decoder(self) -> nn.Parameter | None:
        return self.W_dec if self.cfg.unit_norm_decoder else None
