"""Sparse kernels for k-sparse codes: what makes TopK-style SAEs cheap to train on a CPU.

A TopK SAE (Gao et al. 2024, paper 7) keeps k of its M latents per token. With a batch of N tokens
of width d, only E = N k entries of the code are nonzero, so only the encoder's forward matmul has
to be dense; everything downstream of the selection can cost E d instead of N M d
(Gao et al., App. D; eai-sparsify does the same on GPU):

    step                         dense       here
    pre-activations  x W_enc       N M d       N M d   (cannot be avoided: TopK needs all of them)
    decode           z W_dec       N M d       E d     ``sparse_decode``
    decoder backward               2 N M d     2 E d
    encoder backward x^T G, G W^T  2 N M d     E d     ``selected_preacts`` (+ d M for the biases)

A code is stored as flat entries ``(rows, cols, vals)``, ``rows`` sorted ascending: entry e says
that latent ``cols[e]`` has value ``vals[e]`` on token ``rows[e]``. A per-token TopK code has
``rows = [0]*k + [1]*k + ...``; a BatchTopK code has a variable number of entries per row.

Both backward passes need sums "grouped by latent" (dW[c] = sum over entries with cols = c); they
are computed with ``F.embedding_bag`` over the entries sorted by latent, which never materialises
an E x d tensor. ``topk_preacts`` computes the dense pre-activations into a reused workspace
and keeps only the selected entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Gathered blocks of about this many bytes stay in the last-level cache.
_BLOCK_BYTES = 8 * 2**20
# The dense pre-activations are computed in one matmul up to this size (splitting the batch into
# smaller blocks makes the matmul itself slower), in blocks of rows beyond it.
_MAX_PRE_BYTES = 2**30


def row_offsets(rows: Tensor, n_rows: int) -> Tensor:
    """Start of each row's entries in ``rows`` (sorted ascending): CSR row pointers (n_rows,)."""
    counts = torch.bincount(rows, minlength=n_rows)
    return counts.cumsum(0) - counts


def sum_by_col(rows_of: Tensor, rows: Tensor, cols: Tensor, coef: Tensor, n_cols: int) -> Tensor:
    """out[c] = sum_{e : cols_e = c} coef_e * rows_of[rows_e], shape (n_cols, d).

    This is ``G^T A`` for the sparse matrix ``G`` (entries ``coef`` at ``(rows, cols)``) and a dense
    ``A = rows_of``: one embedding-bag per latent over the entries sorted by latent.
    """
    order = torch.argsort(cols)
    return F.embedding_bag(
        rows[order],
        rows_of,
        row_offsets(cols[order], n_cols),
        per_sample_weights=coef[order].to(rows_of.dtype),
        mode="sum",
    )


def gather_dot(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """out_e = <a[rows_e], b[cols_e]>, shape (E,), without materialising an E x d tensor.

    This is exactly the per-sample-weight gradient of an embedding bag, for which PyTorch has a
    fused loop (``offset2bag`` = rows); if that private op is missing, blocks of E are gathered.
    """
    try:
        return torch.ops.aten._embedding_bag_per_sample_weights_backward(
            a, b, cols, row_offsets(rows, a.shape[0]), rows, 0
        )
    except (AttributeError, RuntimeError):  # pragma: no cover - other PyTorch versions
        out = a.new_empty(rows.numel())
        block = max(64, _BLOCK_BYTES // (8 * max(1, a.shape[1]) * a.element_size()))
        for start in range(0, rows.numel(), block):
            sl = slice(start, start + block)
            out[sl] = torch.linalg.vecdot(a.index_select(0, rows[sl]), b.index_select(0, cols[sl]))
        return out


class SparseDecode(torch.autograd.Function):
    """x_hat_n = sum_{e : rows_e = n} vals_e W_dec[cols_e]  (= z W_dec for the sparse code z).

    Backward, with g = dL/dx_hat (N x d):
        dL/dvals_e = <g[rows_e], W_dec[cols_e]>                       (E d)
        dL/dW_dec[c] = sum_{e : cols_e = c} vals_e g[rows_e]           (E d)
    """

    @staticmethod
    def forward(
        ctx, vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int
    ) -> Tensor:  # type: ignore[override]
        offsets = row_offsets(rows, n_rows)
        ctx.save_for_backward(vals, rows, cols, W_dec)
        return F.embedding_bag(cols, W_dec, offsets, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        vals, rows, cols, W_dec = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_vals = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_vals = gather_dot(grad_out, W_dec, rows, cols)
        if ctx.needs_input_grad[3]:
            grad_w = sum_by_col(grad_out, rows, cols, vals, W_dec.shape[0])
        return grad_vals, None, None, grad_w, None


class SelectedPreacts(torch.autograd.Function):
    """vals_e = pre[rows_e, cols_e] with pre = (x - b_dec) W_enc + b_enc, for selected entries only.

    The forward pass is given the values (the caller already computed the dense ``pre`` to select
    them, without gradient) or, with ``vals=None``, computes them as E dot products. The backward
    pass is that of the dense pre-activation restricted to the selected entries: with G the sparse
    N x M matrix holding dL/dvals at (rows, cols),
        dL/dW_enc = (x - b_dec)^T G            (E d, grouped by latent)
        dL/db_enc = 1^T G,   dL/db_dec = -W_enc (1^T G)^T,   dL/dx = G W_enc^T
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        W_enc: Tensor,
        b_enc: Tensor,
        b_dec: Tensor,
        rows: Tensor,
        cols: Tensor,
        vals: Tensor | None,
    ) -> Tensor:
        x_c = x - b_dec
        if vals is None:
            vals = gather_dot(x_c, W_enc.t(), rows, cols) + b_enc[cols]
        else:
            vals = vals.clone()
        ctx.save_for_backward(x_c, W_enc, rows, cols)
        return vals

    @staticmethod
    def backward(ctx, grad_vals: Tensor):  # type: ignore[override]
        x_c, W_enc, rows, cols = ctx.saved_tensors
        need_x, need_w, need_b_enc, need_b_dec = ctx.needs_input_grad[:4]
        grad_x = grad_w = grad_b_enc = grad_b_dec = None
        if need_w:
            # (M, d) rows grouped by latent, returned as the (d, M) view that matches W_enc.
            grad_w = sum_by_col(x_c, rows, cols, grad_vals, W_enc.shape[1]).t()
        if need_b_enc or need_b_dec:
            col_sums = grad_vals.new_zeros(W_enc.shape[1]).index_add_(0, cols, grad_vals)
            grad_b_enc = col_sums if need_b_enc else None
            grad_b_dec = -(W_enc @ col_sums) if need_b_dec else None
        if need_x:
            offsets = row_offsets(rows, x_c.shape[0])
            grad_x = F.embedding_bag(
                cols, W_enc.t().contiguous(), offsets, per_sample_weights=grad_vals, mode="sum"
            )
        return grad_x, grad_w, grad_b_enc, grad_b_dec, None, None, None


def sparse_decode(vals: Tensor, rows: Tensor, cols: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """``z @ W_dec`` for the sparse code z given as entries; see ``SparseDecode``."""
    return SparseDecode.apply(vals, rows, cols, W_dec, n_rows)


def selected_preacts(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    rows: Tensor,
    cols: Tensor,
    vals: Tensor | None = None,
) -> Tensor:
    """Selected pre-activations with a sparse backward; see ``SelectedPreacts``.

    ``vals``, if given, must equal ``((x - b_dec) @ W_enc + b_enc)[rows, cols]`` (computed without
    gradient); passing it saves the E d products of recomputing it.
    """
    return SelectedPreacts.apply(x, W_enc, b_enc, b_dec, rows, cols, vals)


class Workspace:
    """A scratch buffer reused across calls, grown on demand (never returned to callers)."""

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def get(self, numel: int, like: Tensor) -> Tensor:
        b = self.buffer
        if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
            self.buffer = b = like.new_empty(numel)
        return b[:numel]


@torch.no_grad()
def topk_preacts(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor,
    k: int,
    aux_latents: Tensor | None = None,
    k_aux: int = 0,
    workspace: Workspace | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per token, the k largest pre-activations pre = (x - b_dec) W_enc + b_enc (Gao et al.).

    Returns ``(vals, idx)`` of shape (N, k), and, if ``aux_latents`` (indices of dead latents) and
    ``k_aux > 0`` are given, ``(aux_vals, aux_idx)`` of shape (N, min(k_aux, #dead)): the largest
    pre-activations among those latents (for the AuxK loss). Values are not ReLU'd.

    The N x M pre-activations are written into ``workspace``, which the caller keeps between steps
    (allocating hundreds of MB afresh every step costs page faults), a block of rows at a time if
    they would exceed ``_MAX_PRE_BYTES``. They never leave this function.
    """
    x_c = x - b_dec
    n, m = x_c.shape[0], W_enc.shape[1]
    rows_per_block = max(1, min(n, _MAX_PRE_BYTES // (m * x_c.element_size())))
    buf = (workspace or Workspace()).get(rows_per_block * m, x_c)
    vals, idx = x_c.new_empty(n, k), torch.empty(n, k, dtype=torch.long, device=x_c.device)
    aux_vals = aux_idx = None
    if aux_latents is not None and aux_latents.numel() > 0 and k_aux > 0:
        k_aux = min(k_aux, aux_latents.numel())
        aux_vals = x_c.new_empty(n, k_aux)
        aux_idx = torch.empty(n, k_aux, dtype=torch.long, device=x_c.device)
    for start in range(0, n, rows_per_block):
        sl = slice(start, start + rows_per_block)
        block = x_c[sl]
        pre = torch.addmm(b_enc, block, W_enc, out=buf[: block.shape[0] * m].view(-1, m))
        vals[sl], idx[sl] = pre.topk(k, dim=1, sorted=False)
        if aux_vals is not None and aux_idx is not None and aux_latents is not None:
            v, j = pre.index_select(1, aux_latents).topk(k_aux, dim=1, sorted=False)
            aux_vals[sl], aux_idx[sl] = v, aux_latents[j]
    return vals, idx, aux_vals, aux_idx


# --- shared by the thresholded architectures (ReLU, gated, JumpReLU) ---------------------------
# Above this fraction of nonzero code entries, the E d embedding-bag kernels cost more than the
# dense (N M d) matmuls they replace, and the step takes the dense path (early ReLU training,
# when about half the latents fire). Measured on the whole ReLU train_step (d_in 384, d_sae 3072,
# batch 4096, 2 threads, density set through b_enc, sparse and dense steps interleaved): sparse /
# dense step time 0.52 at density 0.01, 0.70 at 0.05, 0.87-0.93 at 0.06-0.07, 1.07-1.18 at
# 0.08-0.09, 1.26 at 0.15; the crossover lies at about 0.08.
SPARSE_MAX_DENSITY = 0.08


def prefer_sparse(nnz: int, n_rows: int, n_cols: int) -> bool:
    """Whether a code with ``nnz`` nonzero entries out of ``n_rows x n_cols`` is sparse enough
    for the O(nnz d) kernels to beat the dense matmuls (``SPARSE_MAX_DENSITY``)."""
    return nnz <= SPARSE_MAX_DENSITY * n_rows * n_cols


@torch.no_grad()
def entries_where(mask: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The entries ``(rows, cols, values[rows, cols])`` where ``mask`` holds, rows ascending
    (row-major order, as ``sparse_decode`` and ``selected_preacts`` expect)."""
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols, values[rows, cols]


# --- BatchTopK selection and nested reconstructions (BatchTopK, Matryoshka, MSAE) ---------------
# The sample that brackets the BatchTopK threshold takes every s-th pre-activation, s the first of
# these primes that does not divide d_sae (so that the sample visits every latent).
_SAMPLE_STRIDES = (67, 71, 73)


def _sample_bound(flat: Tensor, n_keep: int, n_cols: int) -> Tensor | None:
    """A value that about 1.25 n_keep (+ 4 standard deviations) entries of ``flat`` exceed,
    read off a strided sample; None if that would be most of the sample (small inputs)."""
    stride = next((s for s in _SAMPLE_STRIDES if n_cols % s), 1)
    sample = flat[::stride]
    expected = n_keep * sample.numel() / flat.numel()  # sample entries among the n_keep largest
    want = int(1.25 * expected + 4 * expected**0.5) + 1
    if 2 * want >= sample.numel():
        return None
    return sample.kthvalue(sample.numel() - want + 1).values  # the want-th largest


@torch.no_grad()
def batch_topk_entries(pre: Tensor, n_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``n_keep`` largest entries of ``pre`` (N x M) as ``(rows, cols, vals)``, row-major:
    the BatchTopK selection (Bussmann et al. 2024), without a topk (and a sort) over all N M.

    The entries >= lo, for a value lo from a strided sample (``_sample_bound``), are candidates;
    if there are at least n_keep of them, the n_keep largest entries are all among them (every
    other entry is < lo), so the result is exact: theta = the n_keep-th largest candidate, the
    candidates > theta, and the first (row-major) candidates = theta up to n_keep (ties). If the
    sample misjudged and fewer entries pass, every entry is a candidate.
    """
    flat, n_cols = pre.reshape(-1), pre.shape[1]
    n_keep = min(n_keep, flat.numel())
    idx: Tensor | None = None
    lo = _sample_bound(flat, n_keep, n_cols)
    if lo is not None:
        idx = (flat >= lo).nonzero().squeeze(1)
        idx = idx if idx.numel() >= n_keep else None
    cand = flat if idx is None else flat[idx]
    theta = cand.kthvalue(cand.numel() - n_keep + 1).values
    keep = cand > theta
    n_ties = n_keep - int(keep.sum())
    if n_ties > 0:
        keep[(cand == theta).nonzero().squeeze(1)[:n_ties]] = True
    pos = keep.nonzero().squeeze(1)
    flat_idx = pos if idx is None else idx[pos]
    return flat_idx.div(n_cols, rounding_mode="floor"), flat_idx.remainder(n_cols), cand[pos]


def grouped_decode(
    vals: Tensor, rows: Tensor, cols: Tensor, groups: Tensor, n_groups: int, W_dec: Tensor, n: int
) -> Tensor:
    """Each group's decode of a code split into groups, shape (n_groups, n, d):

        out[g, r] = sum_{e : rows_e = r, groups_e = g} vals_e W_dec[cols_e]

    as one ``sparse_decode`` of all entries onto the virtual rows groups_e * n + rows_e (ordered
    by group, rows ascending within each): O(E d), however many groups. The prefix sums over the
    groups are the reconstructions of nested codes (``prefix_mse``): Matryoshka SAEs (Bussmann et
    al. 2025, paper 22) group the latents by dictionary prefix, MSAE (Zaigrajew et al. 2025,
    paper 28) each token's entries by rank. ``rows`` must be ascending; gradients flow to ``vals``
    and ``W_dec``.
    """
    order = torch.cat([(groups == g).nonzero().squeeze(1) for g in range(n_groups)])
    virtual_rows = (groups * n + rows)[order]
    parts = sparse_decode(vals[order], virtual_rows, cols[order], W_dec, n_groups * n)
    return parts.view(n_groups, n, -1)


class PrefixMSE(torch.autograd.Function):
    """The reconstruction errors of nested codes from their groups' decodes ``parts`` (G, N, d):

        r_g   = target - sum_{j <= g} parts_j           (target = x - b_dec)
        mse_g = ||r_g||^2 / N                            (``reconstruction_mse`` of prefix g)

    Backward, with a_g = (2 / N) dL/dmse_g r_g and A_j = sum_{g >= j} a_g:
        dL/dparts_j = -A_j,   dL/dtarget = A_0.
    Autograd through a cumulative sum and G separate MSEs makes about 20 passes over the
    G x N x d residuals; this makes 6. Also returns r_G (the residual of the full code), detached.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, target: Tensor, parts: Tensor
    ) -> tuple[Tensor, Tensor]:
        n = target.shape[0]
        r = parts.cumsum(0)
        torch.sub(target, r, out=r)
        flat = r.view(r.shape[0], 1, -1)
        mses = torch.bmm(flat, flat.transpose(1, 2)).view(-1) / n
        ctx.save_for_backward(r)
        residual = r[-1].clone()
        ctx.mark_non_differentiable(residual)
        return mses, residual

    @staticmethod
    def backward(ctx, grad_mses: Tensor, _grad_residual: Tensor):  # type: ignore[override]
        (r,) = ctx.saved_tensors
        a = r * (grad_mses * (2.0 / r.shape[1])).view(-1, 1, 1)
        for g in range(r.shape[0] - 2, -1, -1):  # A_g = a_g + A_{g+1}, in place
            a[g] += a[g + 1]
        grad_target = a[0].clone() if ctx.needs_input_grad[0] else None
        return grad_target, a.neg_()


def prefix_mse(target: Tensor, parts: Tensor) -> tuple[Tensor, Tensor]:
    """``(mse_g for every prefix g, the last residual r_G)``; see ``PrefixMSE``."""
    return PrefixMSE.apply(target, parts)
