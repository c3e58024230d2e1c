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

Training (``loss``) is sparse where the gate is closed: f, the L1 term and the frozen-decoder
reconstruction are all zero off the E open-gate entries (pi_gate > 0), and with the shared
weights W_mag = exp(r_mag) * W_gate both pre-activations at an open entry (n, i) come from one
projection u = ((x - b_dec) W_gate)[n, i]:

    pi_gate = u + b_gate[i],    pi_mag = exp(r_mag[i]) * u + b_mag[i].

So after the one dense matmul that finds the open gates, the step costs O(E d) (``sparse_ops``).
When the gates are not sparse (early training; ``prefer_sparse``) the dense step is taken;
``sparse_kernels=False`` always takes it (the reference, with the same values and gradients).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

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
from common.sae.sparse_ops import (
    Workspace,
    entries_where,
    prefer_sparse,
    selected_preacts,
    sparse_decode,
)


@dataclass
class GatedConfig(SAEConfig):
    l1_coefficient: float = 1e-3
    l1_warmup_steps: int = 0
    unit_norm_decoder: bool = True
    decoder_norm_l1: bool = False
    sparse_kernels: bool = True

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


class OpenGates(NamedTuple):
    """The open-gate entries (pi_gate > 0), rows ascending: entry e is latent ``cols[e]`` on token
    ``rows[e]``, with projection ``proj[e] = ((x - b_dec) W_gate)[rows[e], cols[e]]`` (no
    gradient)."""

    rows: Tensor
    cols: Tensor
    proj: Tensor


class GatedTerms(NamedTuple):
    """The differentiable pieces of the loss: x_hat, the (weighted) L1 of ReLU(pi_gate), the
    frozen-decoder reconstruction, and the code f (detached in the sparse path; sparse COO there
    if asked)."""

    x_hat: Tensor
    l1: Tensor
    x_hat_frozen: Tensor
    z: Tensor


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
        self._workspace = Workspace()  # scratch for the dense projection of a training batch

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

    # --- training ------------------------------------------------------------------------------
    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        return self._train_loss(x, ctx, dense_z=True)

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss`` with ``z`` as a sparse COO tensor of the open-gate entries when the sparse
        path is taken (a dense tensor when the step falls back to the dense path)."""
        return self._train_loss(x, ctx, dense_z=False)

    def _train_loss(self, x: Tensor, ctx: TrainContext | None, dense_z: bool) -> LossOutput:
        """L = ||x - x_hat||^2 + lambda(t) * L1(ReLU(pi_gate)) + ||x - x_hat_frozen||^2."""
        ctx = ctx or TrainContext()
        gates = self.open_gates(x) if self.cfg.sparse_kernels else None
        t = self._terms_dense(x) if gates is None else self._terms_sparse(x, gates, dense_z)
        mse = reconstruction_mse(x, t.x_hat)
        aux = reconstruction_mse(x, t.x_hat_frozen)
        lam = l1_schedule(self.cfg.l1_coefficient, self.cfg.l1_warmup_steps, ctx.step)
        loss = mse + lam * t.l1 + aux
        terms = {
            "mse": mse.item(),
            "l1": t.l1.item(),
            "aux_mse": aux.item(),
            "l1_coefficient": lam,
            "fvu": fvu(x, t.x_hat).item(),
        }
        return LossOutput(loss=loss, x_hat=t.x_hat, z=t.z, terms=terms)

    def _terms_dense(self, x: Tensor) -> GatedTerms:
        """The dense reference, O(N M d): every latent of every token."""
        z, pi_gate = self._encode(x)
        x_hat = self.decode(z)
        gate = torch.relu(pi_gate)
        if self.cfg.decoder_norm_l1:
            l1 = (gate * self.W_dec.norm(dim=1)).sum(-1).mean()
        else:
            l1 = gate.sum(-1).mean()
        x_hat_frozen = gate @ self.W_dec.detach() + self.b_dec.detach()
        return GatedTerms(x_hat, l1, x_hat_frozen, z)

    @torch.no_grad()
    def open_gates(self, x: Tensor) -> OpenGates | None:
        """The entries with pi_gate = (x - b_dec) W_gate + b_gate > 0, from one dense matmul
        (into a reused workspace); None if too many are open for the sparse path to pay."""
        n, m = x.shape[0], self.cfg.d_sae
        buf = self._workspace.get(n * m, x).view(n, m)
        proj = torch.mm(x - self.b_dec, self.W_enc, out=buf)
        # proj > -b_gate is exactly fl(proj + b_gate) > 0 (a float sum is 0 only when the two
        # cancel), the dense path's test, without writing pi_gate.
        is_open = proj > -self.b_gate
        if not prefer_sparse(int(is_open.count_nonzero()), n, m):
            return None
        return OpenGates(*entries_where(is_open, proj))

    def _terms_sparse(self, x: Tensor, gates: OpenGates, dense_z: bool) -> GatedTerms:
        """The loss terms as sums over the E open-gate entries, O(E d). At entry e = (n, i):

        u_e       = ((x - b_dec) W_gate)[n, i]      (sparse backward to W_gate, b_dec)
        pi_gate_e = u_e + b_gate[i] > 0,   so ReLU(pi_gate_e) = pi_gate_e
        f_e       = ReLU(exp(r_mag[i]) * u_e + b_mag[i])
        x_hat     = f W_dec + b_dec,   x_hat_frozen = ReLU(pi_gate) sg(W_dec) + sg(b_dec)
        """
        n, m = x.shape[0], self.cfg.d_sae
        rows, cols, proj = gates
        no_bias = proj.new_zeros(m)  # the biases are added per entry below
        u = selected_preacts(x, self.W_enc, no_bias, self.b_dec, rows, cols, proj)
        gate = u + self.b_gate.index_select(0, cols)
        scale = self.r_mag.exp().index_select(0, cols)
        f = torch.relu(u * scale + self.b_mag.index_select(0, cols))
        x_hat = sparse_decode(f, rows, cols, self.W_dec, n) + self.b_dec
        if self.cfg.decoder_norm_l1:
            l1 = (gate * self.W_dec.norm(dim=1).index_select(0, cols)).sum() / n
        else:
            l1 = gate.sum() / n
        frozen = sparse_decode(gate, rows, cols, self.W_dec.detach(), n) + self.b_dec.detach()
        kept = f.detach()
        if dense_z:
            z = x.new_zeros(n, m).index_put_((rows, cols), kept)
        else:
            indices = torch.stack([rows, cols])
            z = torch.sparse_coo_tensor(indices, kept, (n, m), check_invariants=False)
        return GatedTerms(x_hat, l1, frozen, z)

    def unit_norm_decoder(self) -> nn.Parameter | None:
        return self.W_dec if self.cfg.unit_norm_decoder else None
