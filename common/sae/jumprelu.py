"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead"; Gemma Scope; SAEBench, paper 19).

Each latent has a learned threshold theta_i = exp(log_threshold_i) > 0 below which it is zero, and
sparsity is trained on L0 directly rather than on an L1 proxy (so there is no shrinkage):

    pre   = W_enc^T (x - b_dec) + b_enc
    z     = JumpReLU_theta(pre) = pre * H(pre - theta)
    x_hat = W_dec^T z + b_dec
    L     = ||x - x_hat||^2 + lambda(t) * sum_i H(pre_i - theta_i)

H has zero derivative almost everywhere, so theta is trained with straight-through estimators:
pseudo-derivatives with a rectangle kernel K(u) = 1[-1/2 < u < 1/2] of bandwidth epsilon,

    d/dtheta H(pre - theta)          := -(1/epsilon)    K((pre - theta) / epsilon)
    d/dtheta JumpReLU_theta(pre)     := -(theta/epsilon) K((pre - theta) / epsilon)
    d/dpre   JumpReLU_theta(pre)     := H(pre - theta),      d/dpre H(pre - theta) := 0

(as in the paper and DeepMind's code, no STE gradient reaches ``pre``). The chain rule
through exp gives log_threshold its gradient. The paper encodes x itself; subtracting b_dec first
(this package's convention) only reparameterises b_enc.

Training (``loss``) is sparse after the one dense encoder matmul (``sparse_ops``): with
u = (pre - theta) / epsilon, every pseudo-derivative above vanishes outside the entries with
u > -1/2, the code (u > 0) together with the STE window (|u| < 1/2, which holds entries with
z = 0 whose dL/dz still trains theta). The same two autograd Functions run on those E entries
only (theta gathered per entry, so its gradient is an index_add over them), the decoder is
``sparse_decode``, and the encoder backward ``selected_preacts``: O(E d) instead of O(N M d).
When the entries are not sparse (early training, ``prefer_sparse``) the dense step runs;
``sparse_kernels=False`` always runs it (the reference, same values and gradients).

Parameter names match SAELens's ``JumpReLUSAE`` (``W_enc`` ``(d_in, d_sae)``, ``b_enc``,
``W_dec`` ``(d_sae, d_in)``, ``b_dec``) except the threshold: the paper trains ``log_threshold``;
SAELens stores ``threshold`` (and converts ``log_threshold`` on load), so export writes
``threshold = exp(log_threshold)`` (``self.threshold``) with ``apply_b_dec_to_input=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


def rectangle(u: Tensor) -> Tensor:
    """K(u) = 1[-1/2 < u < 1/2], the kernel of the pseudo-derivatives."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class HeavisideSTE(torch.autograd.Function):
    """Forward H(pre - theta); backward d/dtheta = -(1/eps) K((pre - theta)/eps), d/dpre = 0."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * rectangle((pre - threshold) / eps) * grad_out
        return None, grad_threshold.sum_to_size(threshold.shape), None


class JumpReLUSTE(torch.autograd.Function):
    """Forward pre * H(pre - theta); backward d/dpre = H(pre - theta),
    d/dtheta = -(theta/eps) K((pre - theta)/eps)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > threshold).to(pre.dtype) * grad_out
        grad_threshold = -(threshold / eps) * rectangle((pre - threshold) / eps) * grad_out
        return grad_pre, grad_threshold.sum_to_size(threshold.shape), None


@dataclass
class JumpReluConfig(SAEConfig):
    l0_coefficient: float = 1e-3  # lambda, the paper's "sparsity_coefficient"
    l0_warmup_steps: int = 0
    bandwidth: float = 1e-3  # epsilon, in the units of the (normalised) activations
    initial_threshold: float = 1e-3
    unit_norm_decoder: bool = True
    sparse_kernels: bool = True  # train through sparse_ops when the code is sparse

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.l0_coefficient >= 0 and math.isfinite(self.l0_coefficient)):
            raise ValueError(
                f"`l0_coefficient` must be a finite number >= 0, got {self.l0_coefficient}"
            )
        if self.l0_warmup_steps < 0:
            raise ValueError(f"`l0_warmup_steps` must be >= 0, got {self.l0_warmup_steps}")
        for name in ("bandwidth", "initial_threshold"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value}")


@register
class JumpReluSAE(UnitNormDecoderSAE):
    name = "jumprelu"
    config_class = JumpReluConfig
    cfg: JumpReluConfig

    def __init__(self, cfg: JumpReluConfig) -> None:
        super().__init__(cfg)
        w = torch.randn(cfg.d_sae, cfg.d_in)
        unit_norm_rows_(w)
        self.W_enc = nn.Parameter(w.t().clone())
        self.W_dec = nn.Parameter(w.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.initial_threshold)))
        self._workspace = Workspace()  # scratch for the dense pre-activations of a training batch

    @property
    def threshold(self) -> Tensor:
        """theta = exp(log_threshold), shape (d_sae,)."""
        return self.log_threshold.exp()

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """z = JumpReLU_theta(pre), with the straight-through estimator in backward."""
        return JumpReLUSTE.apply(self.pre_activations(x), self.threshold, self.cfg.bandwidth)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    # --- training ------------------------------------------------------------------------------
    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        return self._train_loss(x, ctx, dense_z=True)

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss`` with ``z`` as a sparse COO tensor of its nonzero entries when the sparse
        kernels ran (the dense ``z`` when the step fell back to the dense path)."""
        return self._train_loss(x, ctx, dense_z=False)

    def _train_loss(self, x: Tensor, ctx: TrainContext | None, dense_z: bool) -> LossOutput:
        """L = ||x - x_hat||^2 + lambda(t) L0, sparse when the entries u > -1/2 are few."""
        ctx = ctx or TrainContext()
        lam = l1_schedule(self.cfg.l0_coefficient, self.cfg.l0_warmup_steps, ctx.step)
        entries = self.ste_entries(x) if self.cfg.sparse_kernels else None
        if entries is None:
            z, x_hat, l0 = self._forward_dense(x)
        else:
            z, x_hat, l0 = self._forward_sparse(x, *entries, dense_z=dense_z)
        mse = reconstruction_mse(x, x_hat)
        loss = mse + lam * l0
        terms = {
            "mse": mse.item(),
            "l0": l0.item(),
            "l0_coefficient": lam,
            "fvu": fvu(x, x_hat).item(),
        }
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)

    def _forward_dense(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The dense reference ``(z, x_hat, L0)``: O(N M d)."""
        pre = self.pre_activations(x)
        theta = self.threshold
        z = JumpReLUSTE.apply(pre, theta, self.cfg.bandwidth)
        l0 = HeavisideSTE.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()
        return z, self.decode(z), l0

    @torch.no_grad()
    def ste_entries(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """The entries ``(rows, cols, pre)`` with u = (pre - theta) / epsilon > -1/2, i.e. the
        code (u > 0) and the STE window (|u| < 1/2), rows ascending; None if they are too many
        for the sparse kernels (``prefer_sparse``). One dense matmul, into a reused workspace."""
        n, m = x.shape[0], self.cfg.d_sae
        pre = self._workspace.get(n * m, x).view(n, m)
        torch.addmm(self.b_enc, x - self.b_dec, self.W_enc, out=pre)
        mask = pre > self.threshold - self.cfg.bandwidth / 2
        if not prefer_sparse(int(mask.count_nonzero()), n, m):
            return None
        return entries_where(mask, pre)

    def _forward_sparse(
        self, x: Tensor, rows: Tensor, cols: Tensor, vals: Tensor, dense_z: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(z, x_hat, L0)`` from the entries of ``ste_entries``: the dense path's values and
        gradients, O(E d). ``z`` is detached (dense, or sparse COO if not ``dense_z``).

        pre_e = selected_preacts (gradient to W_enc, b_enc, b_dec, x), theta_e = theta[cols_e]
        (gradient index_add'ed into log_threshold), and the two STE Functions entrywise; entries
        with z_e = 0 pass through ``sparse_decode`` too, which gives them dL/dz_e for theta.
        """
        n, eps = x.shape[0], self.cfg.bandwidth
        pre = selected_preacts(x, self.W_enc, self.b_enc, self.b_dec, rows, cols, vals)
        theta = self.threshold.index_select(0, cols)
        z = JumpReLUSTE.apply(pre, theta, eps)
        x_hat = sparse_decode(z, rows, cols, self.W_dec, n) + self.b_dec
        l0 = HeavisideSTE.apply(pre, theta, eps).sum() / n
        fired = (vals > theta).nonzero().squeeze(1)
        rows, cols, z = rows[fired], cols[fired], z.detach()[fired]
        if dense_z:
            z_out = x.new_zeros(n, self.cfg.d_sae).index_put_((rows, cols), z)
        else:
            z_out = torch.sparse_coo_tensor(
                torch.stack([rows, cols]), z, (n, self.cfg.d_sae), check_invariants=False
            )
        return z_out, x_hat, l0

    def unit_norm_decoder(self) -> nn.Parameter | None:
        return self.W_dec if self.cfg.unit_norm_decoder else None
