"""MP-SAE: the encoder is greedy matching pursuit over the dictionary (Costa et al., paper 41).

    r_0 = x - b_dec,  z = 0
    for t = 1..k:
        j_t = argmax_j <r_{t-1}, d_j>                  (d_j: unit-norm row j of W_dec)
        c_t = max(<r_{t-1}, d_{j_t}>, 0)               (nonnegative codes)
        z_{j_t} += c_t,   r_t = r_{t-1} - c_t d_{j_t}
    x_hat = z W_dec + b_dec  (= x - r_k)
    L     = ||x - x_hat||^2

There is no separate encoder: the code is a function of the dictionary alone, so training only
learns ``W_dec`` and ``b_dec``, with gradients flowing through the unrolled pursuit (the argmax
choice is piecewise constant; the coefficients c_t and residuals are differentiable).
Each step selects the atom that best explains what the previous atoms left over, so later atoms
are conditioned on earlier ones (the "residual-guided" encoder that captures hierarchical and
correlated features). An atom may be picked more than once; its coefficients add up.

Efficiency: the selection scores ``r W_dec^T`` (batch x d_sae per step) are computed without
autograd; only the chosen atom's coefficient is recomputed with gradients as <r, d_j>. The
gradient is identical to back-propagating through the full score matrix (the max only passes
gradient to the chosen entry), but the graph holds k * (batch x d_in) tensors instead of
k * (batch x d_sae), and the backward pass costs O(k * batch * d_in) instead of k dense matmuls.
The scores are updated through the Gram matrix, s_{t+1} = s_t - c_t (D D^T)[j_t], so the forward
pass costs about two dense matmuls instead of k (see ``matching_pursuit``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from common.sae.base import (
    SAE,
    LossOutput,
    SAEConfig,
    TrainContext,
    fvu,
    reconstruction_mse,
    remove_parallel_grad_,
    unit_norm_rows_,
)
from common.sae.registry import register

# Largest dictionary whose (d_sae x d_sae) Gram matrix the pursuit keeps (16384^2 fp32 = 1 GiB).
GRAM_MAX_ATOMS = 16384


@dataclass
class MPConfig(SAEConfig):
    k: int = 32  # matching-pursuit iterations (an upper bound on L0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise ValueError(f"mp config: `k` must be a positive integer, got {self.k!r}")


def matching_pursuit(
    x: Tensor, dictionary: Tensor, k: int, use_gram: bool | None = None
) -> tuple[Tensor, Tensor]:
    """k steps of nonnegative matching pursuit of ``x`` (batch, d) over unit-norm ``dictionary``.

    Returns ``(values, indices)``, each (batch, k): the coefficient c_t and atom j_t chosen at each
    step, differentiable in ``x`` and ``dictionary`` through the c_t (see the module docstring).

    Selection scores s_t = r_t D^T are tracked without autograd. With ``use_gram`` they are updated
    as s_{t+1} = s_t - c_t G[j_t] with the Gram matrix G = D D^T (one (d_sae x d_sae) matrix, then
    O(batch x d_sae) per step instead of a (batch x d_in x d_sae) matmul); by default it is used
    when d_sae <= GRAM_MAX_ATOMS and d_sae < k * batch (when it is cheaper).
    """
    n_atoms = dictionary.shape[0]
    if use_gram is None:
        use_gram = n_atoms <= GRAM_MAX_ATOMS and n_atoms < k * x.shape[0]
    with torch.no_grad():
        scores = x @ dictionary.t()
        gram = dictionary @ dictionary.t() if use_gram else None
    residual = x
    values, indices = [], []
    for _ in range(k):
        with torch.no_grad():
            j = scores.argmax(dim=-1)
        atoms = dictionary[j]  # (batch, d)
        c = torch.relu((residual * atoms).sum(-1))
        residual = residual - c[:, None] * atoms
        values.append(c)
        indices.append(j)
        with torch.no_grad():
            if gram is not None:
                scores -= c.detach()[:, None] * gram[j]
            else:
                scores = residual.detach() @ dictionary.t()
    return torch.stack(values, dim=1), torch.stack(indices, dim=1)


@register
class MPSAE(SAE):
    name = "mp"
    config_class = MPConfig
    cfg: MPConfig

    def __init__(self, cfg: MPConfig) -> None:
        super().__init__(cfg)
        w = torch.randn(cfg.d_sae, cfg.d_in)
        unit_norm_rows_(w)
        self.W_dec = nn.Parameter(w)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def encode(self, x: Tensor) -> Tensor:
        """Dense code z (batch, d_sae): the pursuit coefficients summed per atom."""
        values, indices = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k)
        z = values.new_zeros(x.shape[0], self.cfg.d_sae)
        return z.scatter_add(-1, indices, values)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        values, indices = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k)
        # Sparse decode: sum_t c_t d_{j_t} touches k rows per token instead of d_sae.
        x_hat = torch.einsum("bk,bkd->bd", values, self.W_dec[indices]) + self.b_dec
        mse = reconstruction_mse(x, x_hat)
        z = values.new_zeros(x.shape[0], self.cfg.d_sae).scatter_add(-1, indices, values)
        terms = {"mse": mse.item(), "fvu": fvu(x, x_hat).item()}
        return LossOutput(loss=mse, x_hat=x_hat, z=z, terms=terms)

    @torch.no_grad()
    def before_step(self) -> None:
        remove_parallel_grad_(self.W_dec)

    @torch.no_grad()
    def after_step(self) -> None:
        unit_norm_rows_(self.W_dec.data)
