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
correlated features). An atom may be picked more than once; its coefficients add up. Codes are
kept nonnegative like every other SAE here (the ``overcomplete`` reference code adds the signed
max, which is the same whenever some atom has a positive score).

Efficiency (the pursuit is k sequential steps, so it needs care at batch 4096):
1. the atom choices are found without autograd, tracking the scores s = r W_dec^T through the
   Gram matrix, s_{t+1} = s_t - c_t (D D^T)[j_t]: two dense matmuls in all instead of k
   (``pursuit_indices``);
2. the pursuit is then replayed along those choices with autograd (``pursuit_coefficients``):
   c_t = <r, d_j> for the chosen atom only. The gradient is the same as back-propagating through
   the full score matrix (the max passes gradient only to the chosen entry), but the graph holds
   O(k * batch * d_in) numbers instead of k * batch * d_sae, and the backward pass has no dense
   matmul at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
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

# Largest dictionary whose (d_sae x d_sae) Gram matrix the pursuit keeps (16384^2 fp32 = 1 GiB).
GRAM_MAX_ATOMS = 16384


@dataclass
class MPConfig(SAEConfig):
    k: int = 32  # matching-pursuit iterations (an upper bound on L0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise ValueError(f"mp config: `k` must be a positive integer, got {self.k!r}")


@torch.no_grad()
def pursuit_indices(x: Tensor, dictionary: Tensor, k: int, use_gram: bool | None = None) -> Tensor:
    """The atoms j_1..j_k that nonnegative matching pursuit picks for each row of ``x``: (batch, k).

    Tracks the scores s_t = r_t D^T without autograd. With the Gram matrix G = D D^T they update
    as s_{t+1} = s_t - c_t G[j_t] (c_t = max(s_t[j_t], 0)): O(batch x d_sae) per step instead of
    a (batch x d_in x d_sae) matmul. By default G is used when d_sae <= GRAM_MAX_ATOMS and
    d_sae < k * batch (when it is cheaper than recomputing the scores).
    """
    n_atoms = dictionary.shape[0]
    if use_gram is None:
        use_gram = n_atoms <= GRAM_MAX_ATOMS and n_atoms < k * x.shape[0]
    gram = dictionary @ dictionary.t() if use_gram else None
    scores = x @ dictionary.t()
    rows = torch.empty_like(scores) if use_gram else None
    residual = x.clone()
    chosen = []
    for _ in range(k):
        j = scores.argmax(dim=-1)
        c = scores.gather(1, j[:, None]).clamp_min_(0)  # (batch, 1)
        chosen.append(j)
        if gram is not None:
            torch.index_select(gram, 0, j, out=rows)
            scores.addcmul_(rows, c, value=-1)
        else:
            residual.addcmul_(dictionary[j], c, value=-1)
            scores = residual @ dictionary.t()
    return torch.stack(chosen, dim=1)


def pursuit_coefficients(x: Tensor, dictionary: Tensor, indices: Tensor) -> tuple[Tensor, Tensor]:
    """Replay the pursuit along fixed atom choices, with autograd: returns (c (batch, k), r_k).

    c_t = max(<r_{t-1}, d_{j_t}>, 0), r_t = r_{t-1} - c_t d_{j_t}, r_0 = x. The chosen atoms are
    gathered once (``F.embedding``, whose backward is a fast scatter-add) as a (k, batch, d) tensor.
    """
    # (k, batch, d), split into k contiguous (batch, d) views whose backward is one stack.
    atoms = F.embedding(indices.t(), dictionary).unbind(0)
    residual = x
    values = []
    for atom in atoms:
        c = torch.relu((residual * atom).sum(-1))
        residual = residual - c[:, None] * atom
        values.append(c)
    return torch.stack(values, dim=1), residual


def matching_pursuit(
    x: Tensor, dictionary: Tensor, k: int, use_gram: bool | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """k steps of nonnegative matching pursuit of ``x`` (batch, d) over unit-norm ``dictionary``.

    Returns ``(values, indices, residual)``: the coefficient c_t and atom j_t of each step, each
    (batch, k), and the final residual r_k; values and residual are differentiable in ``x`` and
    ``dictionary`` (the choices are not: they are piecewise constant).
    """
    indices = pursuit_indices(x.detach(), dictionary.detach(), k, use_gram)
    values, residual = pursuit_coefficients(x, dictionary, indices)
    return values, indices, residual


@register
class MPSAE(UnitNormDecoderSAE):
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
        values, indices, _ = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k)
        return values.new_zeros(x.shape[0], self.cfg.d_sae).scatter_add(-1, indices, values)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        values, indices, residual = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k)
        x_hat = x - residual  # = b_dec + sum_t c_t d_{j_t}, without a (batch x d_sae) matmul
        mse = reconstruction_mse(x, x_hat)
        z = values.new_zeros(x.shape[0], self.cfg.d_sae).scatter_add(-1, indices, values)
        terms = {"mse": mse.item(), "fvu": fvu(x, x_hat).item()}
        return LossOutput(loss=mse, x_hat=x_hat, z=z, terms=terms)
