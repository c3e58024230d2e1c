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
   (``pursuit_indices``). Each of the k steps still reads and updates all batch x d_sae scores
   (an exact argmax over every atom needs them): one ``max`` and one sparse x dense update
   (``subtract_gram_rows_``) per step.
2. the dense reference (``sparse_kernels=False``) replays the pursuit along those choices with
   autograd (``pursuit_coefficients``): c_t = <r, d_j> for the chosen atom only, on k residuals
   of batch x d_in.
3. the training step (``sparse_kernels=True``) never forms a residual. With p_t = <r_0, d_{j_t}>
   (read off the first scores) and the within-token Gram entries K_{ts} = <d_{j_t}, d_{j_s}>
   (read off G), c_t = max(p_t - sum_{s<t} K_{ts} c_s, 0) (``gram_coefficients``): the same
   function of (x, W_dec, b_dec) as the replay, so the same loss and gradients, computed on
   batch x k^2 numbers. x_hat = sum_t c_t d_{j_t} + b_dec is a ``sparse_decode``; the backward
   costs O(batch k d_in) plus one d_sae^2 d_in matmul (``GramEntries``: dL/dD = (S + S^T) D).
"""

from __future__ import annotations

import warnings
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
from common.sae.sparse_ops import prefer_sparse, selected_preacts, sparse_decode

# Largest dictionary whose (d_sae x d_sae) Gram matrix the pursuit keeps (16384^2 fp32 = 1 GiB).
GRAM_MAX_ATOMS = 16384


@dataclass
class MPConfig(SAEConfig):
    k: int = 32  # matching-pursuit iterations (an upper bound on L0)
    sparse_kernels: bool = True  # training step without residuals (see the module docstring)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k <= 0:
            raise ValueError(f"mp config: `k` must be a positive integer, got {self.k!r}")


def gram_pays_off(n_atoms: int, k: int, batch: int) -> bool:
    """Whether the pursuit tracks its scores through G = D D^T: when G fits (``GRAM_MAX_ATOMS``)
    and costs less than recomputing the scores (d_sae^2 d_in < k batch d_sae d_in)."""
    return n_atoms <= GRAM_MAX_ATOMS and n_atoms < k * batch


@torch.no_grad()
def subtract_gram_rows_(scores: Tensor, gram: Tensor, j: Tensor, c: Tensor) -> None:
    """s_n <- s_n - c_n G[j_n] for every row n, in place.

    Done as s <- s - E G with E the one-entry-per-row sparse (batch x d_sae) matrix of the c_n:
    one pass over the scores, without gathering the (batch x d_sae) rows G[j] first.
    """
    n = scores.shape[0]
    crow = torch.arange(n + 1, device=scores.device)
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        e = torch.sparse_csr_tensor(crow, j, c, (n, gram.shape[0]), check_invariants=False)
    try:
        scores.addmm_(e, gram, alpha=-1)
    except (NotImplementedError, RuntimeError):  # pragma: no cover - builds without sparse mm
        scores.addcmul_(gram.index_select(0, j), c[:, None], value=-1)


@torch.no_grad()
def gram_pursuit_(scores: Tensor, gram: Tensor, k: int) -> Tensor:
    """The atoms j_1..j_k of the pursuit from the first scores s_0 = r_0 D^T, (batch, k).

    j_t = argmax s_{t-1}, c_t = max(s_{t-1}[j_t], 0), s_t = s_{t-1} - c_t G[j_t] (G = D D^T).
    ``scores`` is overwritten.
    """
    chosen = []
    for t in range(k):
        value, j = scores.max(dim=-1)
        chosen.append(j)
        if t < k - 1:
            subtract_gram_rows_(scores, gram, j, value.clamp_min_(0))
    return torch.stack(chosen, dim=1)


@torch.no_grad()
def pursuit_indices(x: Tensor, dictionary: Tensor, k: int, use_gram: bool | None = None) -> Tensor:
    """The atoms j_1..j_k that nonnegative matching pursuit picks for each row of ``x``: (batch, k).

    Tracks the scores s_t = r_t D^T without autograd. With the Gram matrix G = D D^T they update
    as s_{t+1} = s_t - c_t G[j_t] (c_t = max(s_t[j_t], 0)): O(batch x d_sae) per step instead of
    a (batch x d_in x d_sae) matmul. By default G is used when ``gram_pays_off``.
    """
    if use_gram is None:
        use_gram = gram_pays_off(dictionary.shape[0], k, x.shape[0])
    scores = x @ dictionary.t()
    if use_gram:
        return gram_pursuit_(scores, dictionary @ dictionary.t(), k)
    residual = x.clone()
    chosen = []
    for _ in range(k):
        value, j = scores.max(dim=-1)
        chosen.append(j)
        residual.addcmul_(dictionary[j], value.clamp_min_(0)[:, None], value=-1)
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


class GramEntries(torch.autograd.Function):
    """K_e = <d_{a_e}, d_{b_e}> for pairs of atoms, read off a precomputed G = D D^T.

    Backward: with S the (d_sae x d_sae) matrix summing dL/dK_e at (a_e, b_e),
        dL/dD = (S + S^T) D            (one d_sae^2 d_in matmul)
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, gram: Tensor, dictionary: Tensor, a: Tensor, b: Tensor
    ) -> Tensor:
        m = gram.shape[0]
        ctx.save_for_backward(dictionary, a, b)
        return gram.reshape(-1).index_select(0, (a * m + b).flatten()).view(a.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        dictionary, a, b = ctx.saved_tensors
        m = dictionary.shape[0]
        # S + S^T in one scatter: each dL/dK_e is added at (a_e, b_e) and at (b_e, a_e).
        flat = torch.cat([(a * m + b).flatten(), (b * m + a).flatten()])
        grad = grad.flatten().repeat(2)
        s = grad.new_zeros(m * m).index_add_(0, flat, grad).view(m, m)
        return None, s @ dictionary, None, None


def gram_entries(gram: Tensor, dictionary: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """G[a, b] (any shape of index pairs), differentiable in ``dictionary``; ``gram`` must equal
    ``dictionary @ dictionary.T`` (computed without gradient). See ``GramEntries``."""
    return GramEntries.apply(gram, dictionary, a, b)


class GramCoefficients(torch.autograd.Function):
    """The pursuit coefficients from inner products alone: c (batch, k), for each token

        q_t = p_t - sum_{s<t} K_{ts} c_s,   c_t = max(q_t, 0)

    (p: (batch, k); K: (batch, k(k-1)/2), the pairs s < t in the order of ``tril_indices``).
    Backward, from the last step to the first, with m_t = [q_t > 0]:
        dL/dq_t = m_t (dL/dc_t - sum_{u>t} K_{ut} dL/dq_u),   dL/dp = dL/dq,
        dL/dK_{ts} = -dL/dq_t c_s
    """

    @staticmethod
    def forward(ctx, first: Tensor, pair_gram: Tensor) -> Tensor:  # type: ignore[override]
        # Token-last layout, (k, batch) and (k, k, batch), so each step reads contiguous rows.
        n, k = first.shape
        t_idx, s_idx = torch.tril_indices(k, k, offset=-1, device=first.device)
        gram = first.new_zeros(k, k, n)
        gram[t_idx, s_idx] = pair_gram.t()
        q = first.t().contiguous()
        coefs = torch.zeros_like(q)
        for t in range(k):
            if t > 0:
                q[t] -= torch.linalg.vecdot(gram[t, :t], coefs[:t], dim=0)
            coefs[t] = q[t].clamp_min(0)
        ctx.save_for_backward(gram, coefs, q > 0, t_idx, s_idx)
        return coefs.t()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        gram, coefs, active, t_idx, s_idx = ctx.saved_tensors
        grad = grad.t()
        k = grad.shape[0]
        grad_q = torch.zeros_like(grad)
        for t in reversed(range(k)):
            g = grad[t]
            if t < k - 1:
                g = g - torch.linalg.vecdot(gram[t + 1 :, t], grad_q[t + 1 :], dim=0)
            grad_q[t] = g * active[t]
        return grad_q.t(), -(grad_q[t_idx] * coefs[s_idx]).t()


def gram_coefficients(first: Tensor, pair_gram: Tensor) -> Tensor:
    """c_t = max(<r_{t-1}, d_{j_t}>, 0) = max(p_t - sum_{s<t} K_{ts} c_s, 0), since
    r_{t-1} = r_0 - sum_{s<t} c_s d_{j_s}: the pursuit coefficients with autograd, from
    p_t = <r_0, d_{j_t}> (``first``, (batch, k)) and K_{ts} = <d_{j_t}, d_{j_s}> for s < t
    (``pair_gram``, (batch, k(k-1)/2), in the order of ``tril_indices``). See
    ``GramCoefficients``."""
    return GramCoefficients.apply(first, pair_gram)


def unique_entries(indices: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The code as unique entries (rows, cols, vals), sorted by row then column: an atom chosen
    several times on a token is one entry holding the sum of its coefficients.

    ``indices`` and ``values``: (batch, k). Each token's k atoms are sorted (a sort of k numbers
    per token, not of all batch * k entries); repeats are then adjacent.
    """
    n, k = indices.shape
    cols, order = indices.sort(dim=1)
    new = torch.ones_like(cols, dtype=torch.bool)
    new[:, 1:] = cols[:, 1:] != cols[:, :-1]
    slot = new.cumsum(1) - 1  # (batch, k): the unique entry each chosen atom adds into
    sums = values.new_zeros(n, k).scatter_add_(1, slot, values.gather(1, order))
    rows = torch.arange(n, device=indices.device)[:, None].expand(n, k)
    return rows[new], cols[new], sums.gather(1, slot)[new]


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
        return self._train_loss(x, dense_z=True)

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss`` with ``z`` as a coalesced sparse COO tensor (at most batch * k entries)."""
        return self._train_loss(x, dense_z=False)

    def uses_sparse_kernels(self, batch: int) -> bool:
        """The residual-free step needs G (``gram_pays_off``) and pays off for a sparse code
        (``prefer_sparse`` on its batch * k entries); otherwise the dense reference runs."""
        m, k = self.cfg.d_sae, self.cfg.k
        return (
            self.cfg.sparse_kernels
            and gram_pays_off(m, k, batch)
            and prefer_sparse(batch * k, batch, m)
        )

    def _train_loss(self, x: Tensor, dense_z: bool) -> LossOutput:
        n, m = x.shape[0], self.cfg.d_sae
        if self.uses_sparse_kernels(n):
            x_hat, indices, values = self._reconstruct_sparse(x)
            rows, cols, vals = unique_entries(indices, values)
            if dense_z:
                z = x.new_zeros(n, m).index_put_((rows, cols), vals)
            else:
                entries = torch.stack([rows, cols])
                z = torch.sparse_coo_tensor(
                    entries, vals, (n, m), is_coalesced=True, check_invariants=False
                )
        else:
            values, indices, residual = matching_pursuit(x - self.b_dec, self.W_dec, self.cfg.k)
            x_hat = x - residual  # = b_dec + sum_t c_t d_{j_t}, without a (batch x d_sae) matmul
            z = values.new_zeros(n, m).scatter_add(-1, indices, values)
            z = z if dense_z else z.detach().to_sparse()
        mse = reconstruction_mse(x, x_hat)
        with torch.no_grad():
            terms = {"mse": mse.item(), "fvu": fvu(x, x_hat).item()}
        return LossOutput(loss=mse, x_hat=x_hat, z=z, terms=terms)

    def _reconstruct_sparse(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x_hat = sum_t c_t d_{j_t} + b_dec through the residual-free kernels (module docstring,
        point 3), with the atoms j_t and (detached) coefficients c_t, each (batch, k)."""
        n, k, dictionary = x.shape[0], self.cfg.k, self.W_dec
        with torch.no_grad():
            gram = dictionary @ dictionary.t()
            first = (x - self.b_dec) @ dictionary.t()
            indices = gram_pursuit_(first.clone(), gram, k)
            first_vals = first.gather(1, indices)
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        cols = indices.flatten()
        no_bias = x.new_zeros(self.cfg.d_sae)
        first = selected_preacts(
            x, dictionary.t(), no_bias, self.b_dec, rows, cols, first_vals.flatten()
        )
        t_idx, s_idx = torch.tril_indices(k, k, offset=-1, device=x.device)
        pair_gram = gram_entries(gram, dictionary, indices[:, t_idx], indices[:, s_idx])
        coefs = gram_coefficients(first.view(n, k), pair_gram).flatten()
        x_hat = sparse_decode(coefs, rows, cols, dictionary, n) + self.b_dec
        return x_hat, indices, coefs.detach().view(n, k)
