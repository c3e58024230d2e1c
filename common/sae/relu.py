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
* ``sparse_kernels``: training (``loss``) computes the dense pre-activations once, then works on
  the E firing entries only (``common.sae.sparse_ops``): x_hat, the L1 term and every gradient
  cost O(E d) instead of O(N M d). While the code is dense (early training, when about half the
  latents fire) ``prefer_sparse`` picks the dense path instead; ``False`` always takes it (the
  reference: same values and gradients).
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
from common.sae.sparse_ops import entries_where, prefer_sparse, selected_preacts, sparse_decode


@dataclass
class ReluConfig(SAEConfig):
    l1_coefficient: float = 1e-3
    l1_warmup_steps: int = 0
    tied: bool = False
    unit_norm_decoder: bool = True
    decoder_norm_l1: bool = False
    sparse_kernels: bool = True

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

    # --- training ------------------------------------------------------------------------------
    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        return self._train_loss(x, ctx, sparse_z=False)

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss``, with ``z`` as a sparse COO tensor of its E firing entries when the step took
        the sparse path (dense ``z`` otherwise; ``code_stats`` reads both)."""
        return self._train_loss(x, ctx, sparse_z=True)

    def _train_loss(self, x: Tensor, ctx: TrainContext | None, sparse_z: bool) -> LossOutput:
        """L = ||x - x_hat||^2 + lambda(t) L1, through the sparse or the dense code."""
        ctx = ctx or TrainContext()
        # The one dense N M d matmul (fused bias), with gradient: the dense path uses it as is.
        pre = torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)
        with torch.no_grad():
            firing = pre > 0
            nnz = int(torch.count_nonzero(firing))
        if self.cfg.sparse_kernels and prefer_sparse(nnz, *pre.shape):
            z, x_hat, l1 = self._sparse_code(x, pre.detach(), firing, sparse_z)
        else:
            z, x_hat, l1 = self._dense_code(pre)
        mse = reconstruction_mse(x, x_hat)
        lam = l1_schedule(self.cfg.l1_coefficient, self.cfg.l1_warmup_steps, ctx.step)
        loss = mse + lam * l1
        terms = {
            "mse": mse.item(),
            "l1": l1.item(),
            "l1_coefficient": lam,
            "fvu": fvu(x, x_hat).item(),
        }
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)

    def _l1_weights(self) -> Tensor | None:
        """Per-latent L1 weight ||W_dec[i]|| (Anthropic's April 2024 update), or None for 1."""
        return self.decoder_weight.norm(dim=1) if self.cfg.decoder_norm_l1 else None

    def _dense_code(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z = ReLU(pre), x_hat = z W_dec + b_dec, L1 = mean_n sum_i z_ni w_i: O(N M d)."""
        z = torch.relu(pre)
        x_hat = self.decode(z)
        w = self._l1_weights()
        l1 = (z if w is None else z * w).sum(-1).mean()  # z >= 0, so |z| = z
        return z, x_hat, l1

    def _sparse_code(
        self, x: Tensor, pre: Tensor, firing: Tensor, sparse_z: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The same (z, x_hat, L1) from the E entries e = (n_e, i_e) with pre > 0: O(E d).

            z_e   = pre[n_e, i_e]     (> 0, so ReLU is the identity on them, with slope 1; the
                                       other entries, and their gradients, are 0, as for the ReLU)
            x_hat = sum_{e : n_e = n} z_e W_dec[i_e] + b_dec
            L1    = (1/N) sum_n sum_{e : n_e = n} z_e w_{i_e}

        ``selected_preacts`` gives z_e the gradient of the dense pre-activation (into x, W_enc,
        b_enc, b_dec); tied, W_dec = W_enc^T is a view, so both gradients reach W_enc.
        """
        n = x.shape[0]
        rows, cols, vals = entries_where(firing, pre)
        z_e = selected_preacts(x, self.W_enc, self.b_enc, self.b_dec, rows, cols, vals)
        x_hat = sparse_decode(z_e, rows, cols, self.decoder_weight, n) + self.b_dec
        w = self._l1_weights()
        weighted = z_e if w is None else z_e * w[cols]
        l1 = x.new_zeros(n).index_add(0, rows, weighted).mean()  # row sums, then the mean
        kept = z_e.detach()
        if sparse_z:
            indices = torch.stack([rows, cols])
            z = torch.sparse_coo_tensor(indices, kept, pre.shape, check_invariants=False)
        else:
            z = torch.zeros_like(pre).index_put_((rows, cols), kept)
        return z, x_hat, l1

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
