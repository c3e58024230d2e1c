"""TopK SAE (Gao et al., ICLR 2025, paper 7) and BatchTopK SAE (Bussmann et al. 2024, paper 22).

TopK:
    pre   = W_enc^T (x - b_dec) + b_enc
    z     = TopK_k(ReLU(pre))                       (the k largest entries per token, others 0)
    x_hat = W_dec^T z + b_dec
    L     = ||x - x_hat||^2 + alpha * L_aux

AuxK (Gao et al., App. A.2), for the latents that have not fired for ``dead_after_tokens`` tokens
(``TrainContext.dead_mask``):
    e     = x - x_hat                                (no gradient)
    z_aux = TopK_{k_aux}(ReLU(pre restricted to the dead latents)),   k_aux = d_in // 2 by default
    e_hat = W_dec^T z_aux                            (no bias)
    L_aux = ||e - e_hat||^2 / ||e - mean(e)||^2      (sums over the batch)
Gao et al.'s text writes L_aux = ||e - e_hat||^2 next to a main loss that is the *normalised* MSE;
their released code normalises both. We follow the paper and normalise L_aux by the variance of
the residual, so that ``aux_coefficient = 1/32`` means the same whatever the scale of x
(``aux_normalize=False`` gives the plain per-token ||e - e_hat||^2 that SAELens uses).

BatchTopK (Bussmann, Leask & Nanda 2024; the base of Matryoshka SAEs, paper 22): in training, keep
the B*k largest ReLU'd pre-activations of the whole batch of B tokens, so k is an average.
For inference a single threshold theta replaces the batch dependence (JumpReLU-style):
    z = pre * 1[pre > theta],   theta = running mean over batches of the smallest kept activation
``sae.train()`` selects BatchTopK, ``sae.eval()`` the threshold; theta is a buffer, so it is saved.

Both keep unit-norm decoder rows (tangent gradient in ``before_step``, renormalisation in
``after_step``) and initialise the encoder as the decoder transpose (``tied_init``), scaled by
one least-squares factor fitted on the initialisation sample (``init_scale``; our addition: it
changes no selection, only the size of the first reconstructions, which otherwise overshoot).
Training (``loss``) uses the sparse kernels of ``sparse_ops`` (dense forward matmul, everything
else O(B k d)); ``sparse_kernels=False`` gives the dense reference with identical gradients.
Parameter names and shapes follow SAELens: W_enc (d_in, d_sae), b_enc (d_sae,),
W_dec (d_sae, d_in), b_dec (d_in,).
"""

from __future__ import annotations

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
from common.sae.sparse_ops import (
    Workspace,
    batch_topk_entries,
    prefer_sparse,
    selected_preacts,
    sparse_decode,
    topk_preacts,
)
from common.sae.sparsity import batch_topk_activation, topk_activation


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32
    k_aux: int | None = None  # None -> d_in // 2 (Gao et al., App. B.1)
    aux_coefficient: float = 1 / 32
    aux_normalize: bool = True
    tied_init: bool = True
    init_scale: bool = True  # init_from_data fits the scale of W_enc (see TopKSAE.init_from_data)
    sparse_kernels: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
            raise ValueError(
                f"SAE config: `k` must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}"
            )
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)
        if not isinstance(self.k_aux, int) or isinstance(self.k_aux, bool) or self.k_aux <= 0:
            raise ValueError(f"SAE config: `k_aux` must be a positive integer, got {self.k_aux!r}")
        if not self.aux_coefficient >= 0:
            raise ValueError(
                f"SAE config: `aux_coefficient` must be >= 0, got {self.aux_coefficient}"
            )


class Selection(NamedTuple):
    """A sparse code as entries (rows sorted): latent ``cols[e]`` has value ``vals[e]`` on token
    ``rows[e]``. ``vals`` are the raw pre-activations (before the ReLU), without gradient."""

    rows: Tensor
    cols: Tensor
    vals: Tensor


class Codes(NamedTuple):
    """What one training forward pass produces: the dense code ``z`` (detached in the sparse
    path), the reconstruction, the AuxK reconstruction of the residual (or None), and the kept
    activations ``kept`` (detached, one per selected entry)."""

    z: Tensor
    x_hat: Tensor
    e_hat: Tensor | None
    kept: Tensor


def _unit_rows(w: Tensor) -> Tensor:
    unit_norm_rows_(w)
    return w


def _per_row(vals: Tensor, idx: Tensor) -> Selection:
    n, k = idx.shape
    return Selection(torch.arange(n).repeat_interleave(k), idx.flatten(), vals.flatten())


def _aux_selection(pre: Tensor, dead: Tensor, k_aux: int) -> Selection:
    """Per token, the k_aux largest pre-activations among the dead latents (``dead``: indices)."""
    vals, j = pre.index_select(1, dead).topk(min(k_aux, dead.numel()), dim=1, sorted=False)
    return _per_row(vals, dead[j])


@register
class TopKSAE(UnitNormDecoderSAE):
    name = "topk"
    config_class = TopKConfig
    cfg: TopKConfig

    def __init__(self, cfg: TopKConfig) -> None:
        super().__init__(cfg)
        w_dec = _unit_rows(torch.randn(cfg.d_sae, cfg.d_in))
        w_enc = w_dec.clone() if cfg.tied_init else _unit_rows(torch.randn_like(w_dec))
        # W_enc is (d_in, d_sae) as in SAELens, stored as the transpose of a (d_sae, d_in) block so
        # that the sparse encoder gradient (one row of d_in numbers per latent) is written in place.
        self.W_enc = nn.Parameter(w_enc.t())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self._workspace = Workspace()  # scratch for the dense pre-activations of a training batch

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec = mean(x); then, if ``init_scale``, W_enc <- c W_enc with the least-squares scale
        c = <x - b_dec, r> / ||r||^2, r = W_dec^T z(x) - the reconstruction before scaling.

        The selection does not depend on c (b_enc = 0 at init), so this only sets the magnitude of
        the first reconstructions: with unit-norm W_enc = W_dec^T, the k largest projections
        overshoot (FVU > 1 at step 0) and the first hundred Adam steps only undo that.
        """
        super().init_from_data(x)
        if not self.cfg.init_scale:
            return
        x_c = x - self.b_dec
        recon = self.decode(self.encode(x)) - self.b_dec
        # Row sums first, then a float64 sum of N numbers: a flat float32 ``sum()`` over N x d
        # entries is split across threads, so its rounding (and every weight after it) would
        # depend on the thread count; N row sums fall under torch's parallel grain, one thread.
        num = (x_c * recon).sum(dim=1, dtype=torch.float64).sum()
        den = recon.pow(2).sum(dim=1, dtype=torch.float64).sum().clamp_min(1e-12)
        scale = (num / den).to(x.dtype)
        if torch.isfinite(scale) and scale > 0:
            self.W_enc.mul_(scale)

    # --- dense interface (inference, evaluation) ----------------------------------------------
    def pre_activations(self, x: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        return topk_activation(pre, self.cfg.k)

    def encode(self, x: Tensor) -> Tensor:
        return self.activation(self.pre_activations(x))

    def decode(self, z: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, z, self.W_dec)

    # --- training ------------------------------------------------------------------------------
    def select(self, x: Tensor, dead: Tensor | None) -> tuple[Selection, Selection | None]:
        """Entries of the code (and of the AuxK code if ``dead`` latent indices are given)."""
        vals, idx, aux_vals, aux_idx = topk_preacts(
            x,
            self.W_enc,
            self.b_enc,
            self.b_dec,
            self.cfg.k,
            dead,
            self.cfg.k_aux or 0,
            workspace=self._workspace,
        )
        aux = _per_row(aux_vals, aux_idx) if aux_vals is not None and aux_idx is not None else None
        return _per_row(vals, idx), aux

    def _sparse_code(self, x: Tensor, sel: Selection) -> Tensor:
        """ReLU(pre[rows, cols]) with the gradient of the dense pre-activation at those entries."""
        pre = selected_preacts(x, self.W_enc, self.b_enc, self.b_dec, sel.rows, sel.cols, sel.vals)
        return torch.relu(pre)

    def _codes_sparse(self, x: Tensor, dead: Tensor | None, dense_z: bool = True) -> Codes:
        """The training forward pass through the sparse kernels (``z`` sparse COO if not
        ``dense_z``)."""
        n = x.shape[0]
        with torch.no_grad():
            sel, aux = self.select(x, dead)
        vals = self._sparse_code(x, sel)
        x_hat = sparse_decode(vals, sel.rows, sel.cols, self.W_dec, n) + self.b_dec
        e_hat = None
        if aux is not None:
            e_hat = sparse_decode(self._sparse_code(x, aux), aux.rows, aux.cols, self.W_dec, n)
        kept = vals.detach()
        if dense_z:
            z = x.new_zeros(n, self.cfg.d_sae).index_put_((sel.rows, sel.cols), kept)
        else:
            indices = torch.stack([sel.rows, sel.cols])
            z = torch.sparse_coo_tensor(indices, kept, (n, self.cfg.d_sae), check_invariants=False)
        return Codes(z, x_hat, e_hat, kept)

    def _codes_dense(self, x: Tensor, dead: Tensor | None, dense_z: bool = True) -> Codes:
        """The dense reference: same values and gradients as ``_codes_sparse``, O(B M d) cost."""
        pre = self.pre_activations(x)
        z = self.activation(pre)
        x_hat = self.decode(z)
        e_hat = None
        if dead is not None:
            aux = _aux_selection(pre.detach(), dead, self.cfg.k_aux or 0)
            z_aux = torch.zeros_like(pre).index_put(
                (aux.rows, aux.cols), torch.relu(pre[aux.rows, aux.cols])
            )
            e_hat = z_aux @ self.W_dec
        kept = z.detach()[z.detach() > 0]
        return Codes(z if dense_z else z.detach().to_sparse(), x_hat, e_hat, kept)

    def aux_loss(self, e: Tensor, e_hat: Tensor) -> Tensor:
        """L_aux = ||e - e_hat||^2 / ||e - mean e||^2 (or per-token ||e - e_hat||^2)."""
        if self.cfg.aux_normalize:
            return fvu(e, e_hat)
        return reconstruction_mse(e, e_hat)

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        return self._train_loss(x, ctx, dense_z=True)[0]

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss`` with ``z`` as a sparse COO tensor (its B*k entries): a trainer that reads
        firing and L0 from ``z.indices()`` is spared building and scanning a B x d_sae matrix."""
        return self._train_loss(x, ctx, dense_z=False)[0]

    def _train_loss(
        self, x: Tensor, ctx: TrainContext | None, dense_z: bool
    ) -> tuple[LossOutput, Codes | None]:
        ctx = ctx or TrainContext()
        dead = None
        if ctx.dead_mask is not None and self.cfg.aux_coefficient > 0:
            dead = ctx.dead_mask.nonzero().squeeze(1)
            dead = dead if dead.numel() > 0 else None
        codes = self._codes_sparse if self.cfg.sparse_kernels else self._codes_dense
        out = codes(x, dead, dense_z)
        x_hat, e_hat = out.x_hat, out.e_hat
        mse = reconstruction_mse(x, x_hat)
        loss, terms = mse, {"mse": mse.item()}
        if e_hat is not None:
            aux = self.aux_loss((x - x_hat).detach(), e_hat)
            loss = loss + self.cfg.aux_coefficient * aux
            terms["aux"] = aux.item()
        with torch.no_grad():
            terms["fvu"] = fvu(x, x_hat).item()
            terms["n_dead"] = 0.0 if dead is None else float(dead.numel())
        return LossOutput(loss=loss, x_hat=x_hat, z=out.z, terms=terms), out


@dataclass
class BatchTopKConfig(TopKConfig):
    # Weight of the newest batch in the running mean of theta; the first 1/threshold_lr batches
    # are averaged uniformly (a plain running mean), later ones exponentially.
    threshold_lr: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(
                f"SAE config: `threshold_lr` must be in (0, 1], got {self.threshold_lr}"
            )


@register
class BatchTopKSAE(TopKSAE):
    name = "batchtopk"
    config_class = BatchTopKConfig
    cfg: BatchTopKConfig
    threshold: Tensor
    threshold_updates: Tensor

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))

    def activation(self, pre: Tensor) -> Tensor:
        if self.training:
            return batch_topk_activation(pre, self.cfg.k)
        return pre * (pre > self.threshold.to(pre.dtype))

    def select(self, x: Tensor, dead: Tensor | None) -> tuple[Selection, Selection | None]:
        """The B*k largest pre-activations of the batch (``batch_topk_entries``: exact, without a
        topk and a sort over all B*M of them), and the AuxK entries if ``dead`` is given."""
        n, m = x.shape[0], self.cfg.d_sae
        pre = self._workspace.get(n * m, x).view(n, m)
        torch.addmm(self.b_enc, x - self.b_dec, self.W_enc, out=pre)
        sel = Selection(*batch_topk_entries(pre, self.cfg.k * n))
        return sel, (_aux_selection(pre, dead, self.cfg.k_aux or 0) if dead is not None else None)

    def _codes_sparse(self, x: Tensor, dead: Tensor | None, dense_z: bool = True) -> Codes:
        """The sparse kernels while k / d_sae is a sparse enough code (``prefer_sparse``), the
        dense path otherwise (same values and gradients)."""
        if not prefer_sparse(self.cfg.k * x.shape[0], x.shape[0], self.cfg.d_sae):
            return self._codes_dense(x, dead, dense_z)
        return super()._codes_sparse(x, dead, dense_z)

    @torch.no_grad()
    def update_threshold(self, kept: Tensor) -> None:
        """theta <- theta + max(lr, 1/t) (min_{z > 0} z - theta), over the kept activations z."""
        positive = kept[kept > 0]
        if positive.numel() == 0:
            return
        self.threshold_updates += 1
        rate = max(self.cfg.threshold_lr, 1.0 / self.threshold_updates.item())
        self.threshold += rate * (positive.min().double() - self.threshold)

    def _train_loss(
        self, x: Tensor, ctx: TrainContext | None, dense_z: bool
    ) -> tuple[LossOutput, Codes | None]:
        if not self.training:  # inference encoding; no AuxK, no threshold update
            z = self.encode(x)
            x_hat = self.decode(z)
            mse = reconstruction_mse(x, x_hat)
            z = z if dense_z else z.detach().to_sparse()
            terms = {"mse": mse.item(), "fvu": fvu(x, x_hat).item()}
            return LossOutput(mse, x_hat, z, terms), None
        out, codes = super()._train_loss(x, ctx, dense_z)
        if codes is not None:
            self.update_threshold(codes.kept)
        out.terms["threshold"] = self.threshold.item()
        return out, codes
