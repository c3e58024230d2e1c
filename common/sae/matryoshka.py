"""Two "Matryoshka" SAEs: nested dictionaries (paper 22) and nested k (paper 28).

``matryoshka`` -- Matryoshka SAE (paper 22: Bussmann et al., ICML 2025; Nabeshima 2024). The
dictionary has nested prefixes m_1 < m_2 < ... < m_n = d_sae and every prefix must reconstruct the
input on its own, so the first latents learn general features (a parent) that later, more specific
latents (its children) cannot absorb:

    pre   = W_enc^T (x - b_dec) + b_enc
    z     = BatchTopK_k(pre)                       (training: the B*k largest entries of the batch)
    z     = pre * 1[pre > theta]                   (eval mode: theta estimated during training)
    x_m   = z[:, :m] W_dec[:m] + b_dec             for every prefix m
    L     = sum_{m in M} ||x - x_m||^2 + aux_coefficient * L_aux

``prefix_loss="sum"`` is the paper's equation (the default); ``"mean"`` divides by the number of
prefixes, as the reference code (bartbussmann/matryoshka_sae, dictionary_learning) does. A single
prefix ``[d_sae]`` is a plain BatchTopK SAE (Bussmann et al., 2024), the baseline the paper compares
against. The inference threshold follows BatchTopK: theta is an exponential moving average of the
smallest activation BatchTopK kept in each training batch.

``msae`` -- Matryoshka SAE for CLIP (paper 28: Zaigrajew et al., ICML 2025). The nesting is over
the number of active latents instead of the dictionary: for k_1 < ... < k_h

    z_i   = ReLU(TopK_{k_i}(W_enc^T (x - b_pre) + b_enc)),   x_i = W_dec^T z_i + b_pre
    L     = sum_i alpha_i ||x - x_i||^2

so TopK_{k_1} is contained in ... TopK_{k_h}: a small k gives coarse concepts, a larger k finer
ones. At inference the paper drops TopK and keeps only the ReLU (``inference_topk=False``, the
default); ``inference_topk=True`` keeps TopK with the largest k. Paper 28 also centres and scales
the embeddings (E||x|| = sqrt(d)) -- that is preprocessing of the data, not part of this module.

Both use unit-norm decoder rows (tangent-projected gradient before the step, renormalised after)
and can revive dead latents with the AuxK loss of Gao et al. (2024):

    e     = x - x_hat  (the full reconstruction, detached)
    L_aux = ||e - TopK_{k_aux}(pre masked to dead latents) W_dec||^2

Training through ``sparse_ops`` (``sparse_kernels=True``, the default, taken while the code is
sparse: ``prefer_sparse``): after the one dense encoder matmul that the selection needs, the step
is O(E d) for the E selected entries, without a dense code per prefix. The selection (BatchTopK over
the whole dictionary, or one per-token TopK_{k_h} whose first k_i entries are TopK_{k_i}) gives the
entries once; entry e belongs to group g (the latents in [m_{g-1}, m_g), or the ranks in
[k_{g-1}, k_g)); ``grouped_decode`` decodes every group's entries at once, and ``prefix_mse``
sums the groups cumulatively into every prefix's reconstruction error: O(E d + G B d).
``sparse_kernels=False`` is the dense reference (same values and gradients).

Parameter names and shapes follow SAELens: W_enc (d_in, d_sae), b_enc, W_dec (d_sae, d_in), b_dec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
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
    grouped_decode,
    prefer_sparse,
    prefix_mse,
    selected_preacts,
    sparse_decode,
)
from common.sae.sparsity import batch_topk_activation, topk_activation
from common.sae.topk import _aux_selection

DEFAULT_PREFIX_FRACTIONS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object) -> None:
    if not _is_int(value) or value <= 0:  # type: ignore[operator]
        raise ValueError(f"SAE config: `{name}` must be a positive integer, got {value!r}")


def _check_coefficient(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"SAE config: `{name}` must be a finite number >= 0, got {value!r}")


def auxk_loss(
    pre: Tensor, residual: Tensor, W_dec: Tensor, dead_mask: Tensor | None, k_aux: int
) -> Tensor:
    """AuxK (Gao et al. 2024): L_aux = ||e - TopK_{k_aux}(pre on dead latents) W_dec||^2.

    ``residual`` is e = x - x_hat, detached by the caller; zero when no latent is dead.
    """
    if dead_mask is None or not bool(dead_mask.any()):
        return pre.new_zeros(())
    k = min(k_aux, int(dead_mask.sum()))
    z_aux = topk_activation(pre * dead_mask.to(pre.dtype), k)  # alive latents are zeroed first
    return reconstruction_mse(residual, z_aux @ W_dec)


class NestedStep(NamedTuple):
    """One training forward pass: the code z (detached in the sparse path), every prefix's
    reconstruction error mse_g (G,), the full reconstruction x_hat, L_aux, and the kept
    activations (detached)."""

    z: Tensor
    mses: Tensor
    x_hat: Tensor
    aux: Tensor
    kept: Tensor


class _UnitNormSAE(UnitNormDecoderSAE):
    """Shared parameters and decoder constraints of the two Matryoshka variants."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        w = torch.randn(cfg.d_sae, cfg.d_in)
        unit_norm_rows_(w)
        self.W_enc = nn.Parameter(w.t().clone())  # encoder initialised as the decoder transpose
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w.clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self._workspace = Workspace()  # scratch for the dense pre-activations of a training batch

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    # --- the sparse training path (sparse_ops) ------------------------------------------------
    def sparse_enough(self, x: Tensor, k: int) -> bool:
        """Whether a code with k entries per token is sparse enough for the sparse kernels."""
        return prefer_sparse(k * x.shape[0], x.shape[0], self.cfg.d_sae)

    @torch.no_grad()
    def dense_preacts(self, x: Tensor) -> Tensor:
        """pre = (x - b_dec) W_enc + b_enc into the reused workspace, without gradient (what the
        selection reads; it must not outlive the step)."""
        n, m = x.shape[0], self.cfg.d_sae
        pre = self._workspace.get(n * m, x).view(n, m)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc, out=pre)

    def entry_values(self, x: Tensor, rows: Tensor, cols: Tensor, raw: Tensor) -> Tensor:
        """ReLU(pre[rows, cols]) with the gradient of the dense pre-activation at those entries."""
        vals = selected_preacts(x, self.W_enc, self.b_enc, self.b_dec, rows, cols, raw)
        return torch.relu(vals)

    def auxk_sparse(
        self,
        x: Tensor,
        pre: Tensor,
        residual: Tensor,
        dead_mask: Tensor | None,
        k_aux: int,
        coefficient: float,
    ) -> Tensor:
        """``auxk_loss`` from the entries of TopK_{k_aux} over the dead latents (O(B k_aux d));
        without gradient if its ``coefficient`` is 0 (then it is only a logged term)."""
        if dead_mask is None or not bool(dead_mask.any()):
            return x.new_zeros(())
        with torch.no_grad():
            sel = _aux_selection(pre, dead_mask.nonzero().squeeze(1), k_aux)
        with torch.set_grad_enabled(torch.is_grad_enabled() and coefficient > 0):
            vals = self.entry_values(x, sel.rows, sel.cols, sel.vals)
            e_hat = sparse_decode(vals, sel.rows, sel.cols, self.W_dec, x.shape[0])
            return reconstruction_mse(residual, e_hat)

    def nested_sparse(
        self,
        x: Tensor,
        pre: Tensor,
        sel: tuple[Tensor, Tensor, Tensor],
        groups: Tensor,
        n_groups: int,
        aux: tuple[Tensor | None, int, float],
        dense_z: bool,
    ) -> NestedStep:
        """The step after the selection ``sel`` = (rows, cols, raw pre-activations), its entries
        split into nested ``groups``: O(E d + G B d) (``grouped_decode``, ``prefix_mse``).
        ``aux`` = (dead mask, k_aux, aux_coefficient)."""
        rows, cols, raw = sel
        vals = self.entry_values(x, rows, cols, raw)
        parts = grouped_decode(vals, rows, cols, groups, n_groups, self.W_dec, x.shape[0])
        mses, residual = prefix_mse(x - self.b_dec, parts)
        l_aux = self.auxk_sparse(x, pre, residual, *aux)
        z = self.code_tensor(rows, cols, vals, x.shape[0], dense_z)
        return NestedStep(z, mses, x.detach() - residual, l_aux, vals.detach())

    def code_tensor(self, rows: Tensor, cols: Tensor, vals: Tensor, n: int, dense: bool) -> Tensor:
        """The code z (n, d_sae), detached, from its entries: dense, or sparse COO."""
        vals = vals.detach()
        if dense:
            return vals.new_zeros(n, self.cfg.d_sae).index_put_((rows, cols), vals)
        shape = (n, self.cfg.d_sae)
        indices = torch.stack([rows, cols])
        return torch.sparse_coo_tensor(indices, vals, shape, check_invariants=False)


# --- paper 22: nested dictionaries ----------------------------------------------------------------
@dataclass
class MatryoshkaConfig(SAEConfig):
    """``prefixes``: increasing sizes ending at ``d_sae`` (ints) or fractions of ``d_sae`` in
    (0, 1] ending at 1 (floats); or ``group_sizes``: sizes of consecutive groups summing to
    ``d_sae``. Give at most one; with neither, prefixes are d_sae * (1/16, 1/8, 1/4, 1/2, 1)."""

    k: int = 32
    prefixes: list[int] | list[float] | None = None
    group_sizes: list[int] | None = None
    prefix_loss: str = "sum"
    aux_coefficient: float = 1 / 32
    k_aux: int | None = None  # default d_in // 2 (Gao et al.)
    threshold_momentum: float = 0.01
    sparse_kernels: bool = True  # train through sparse_ops while the code is sparse

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive_int("k", self.k)
        if self.k > self.d_sae:
            raise ValueError(f"SAE config: `k` ({self.k}) must be <= `d_sae` ({self.d_sae})")
        if self.k_aux is not None:
            _check_positive_int("k_aux", self.k_aux)
        _check_coefficient("aux_coefficient", self.aux_coefficient)
        if not 0 < self.threshold_momentum <= 1:
            raise ValueError(
                f"SAE config: `threshold_momentum` must be in (0, 1], got {self.threshold_momentum}"
            )
        if self.prefix_loss not in ("sum", "mean"):
            raise ValueError(
                f"SAE config: `prefix_loss` must be 'sum' (paper 22's equation) or 'mean' "
                f"(reference code), got {self.prefix_loss!r}"
            )
        if self.prefixes is not None and self.group_sizes is not None:
            raise ValueError("SAE config: give `prefixes` or `group_sizes`, not both")
        if self.prefixes is not None:
            self.prefixes = list(self.prefixes)
        if self.group_sizes is not None:
            self.group_sizes = list(self.group_sizes)
        self.prefix_sizes()  # validates

    def prefix_sizes(self) -> list[int]:
        """The resolved prefix sizes m_1 < ... < m_n = d_sae."""
        if self.group_sizes is not None:
            if not self.group_sizes or not all(_is_int(g) and g > 0 for g in self.group_sizes):
                raise ValueError(
                    f"SAE config: `group_sizes` must be a non-empty list of positive integers, "
                    f"got {self.group_sizes!r}"
                )
            if sum(self.group_sizes) != self.d_sae:
                raise ValueError(
                    f"SAE config: `group_sizes` must sum to d_sae={self.d_sae}, got "
                    f"{self.group_sizes} (sum {sum(self.group_sizes)})"
                )
            return [int(s) for s in torch.tensor(self.group_sizes).cumsum(0).tolist()]
        if self.prefixes is None:
            return sorted({max(1, round(f * self.d_sae)) for f in DEFAULT_PREFIX_FRACTIONS})
        p = self.prefixes
        if not p or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in p):
            raise ValueError(
                f"SAE config: `prefixes` must be a non-empty list of numbers, got {p!r}"
            )
        if any(isinstance(v, float) for v in p):  # fractions of d_sae
            if not all(0 < v <= 1 for v in p):
                raise ValueError(
                    f"SAE config: `prefixes` given as fractions must lie in (0, 1], got {p!r}; "
                    "give integer sizes or fractions, not a mix"
                )
            sizes = [round(v * self.d_sae) for v in p]
        else:
            sizes = [int(v) for v in p]
        if sizes[0] <= 0 or any(b <= a for a, b in pairwise(sizes)):
            raise ValueError(
                f"SAE config: `prefixes` must be strictly increasing positive sizes, got {p!r} "
                f"(sizes {sizes} for d_sae={self.d_sae})"
            )
        if sizes[-1] != self.d_sae:
            raise ValueError(
                f"SAE config: the last of `prefixes` must be d_sae={self.d_sae} (or 1.0), got {p!r}"
            )
        return sizes


@register
class MatryoshkaSAE(_UnitNormSAE):
    name = "matryoshka"
    config_class = MatryoshkaConfig
    cfg: MatryoshkaConfig
    threshold: Tensor

    def __init__(self, cfg: MatryoshkaConfig) -> None:
        super().__init__(cfg)
        self.prefix_sizes = cfg.prefix_sizes()
        # theta < 0 means "not estimated yet": eval mode then falls back to BatchTopK.
        self.register_buffer("threshold", torch.tensor(-1.0))

    def encode(self, x: Tensor) -> Tensor:
        """BatchTopK in training mode; the estimated threshold theta in eval mode."""
        pre = self.pre_activations(x)
        if self.training or self.threshold.item() < 0:
            return batch_topk_activation(pre, self.cfg.k)
        return torch.relu(pre) * (pre > self.threshold)

    def prefix_reconstructions(self, z: Tensor) -> list[Tensor]:
        """x_m = z[:, :m] W_dec[:m] + b_dec for every prefix m (cumulative over groups)."""
        out, x_hat, start = [], self.b_dec.expand(z.shape[0], -1), 0
        for m in self.prefix_sizes:
            x_hat = x_hat + z[:, start:m] @ self.W_dec[start:m]
            out.append(x_hat)
            start = m
        return out

    @torch.no_grad()
    def update_threshold(self, z: Tensor) -> None:
        """theta <- (1 - mu) theta + mu * min{z > 0}: the smallest activation BatchTopK kept
        (``z``: the code, or only its kept values)."""
        kept = z[z > 0]
        if kept.numel() == 0:
            return
        value, mu = kept.min(), self.cfg.threshold_momentum
        if self.threshold.item() < 0:
            self.threshold.copy_(value)
        else:
            self.threshold.mul_(1 - mu).add_(mu * value)

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        return self._train_loss(x, ctx, dense_z=True)

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss`` with ``z`` as a sparse COO tensor (its B*k entries) on the sparse path (the
        dense fallback returns its dense z: converting it would scan B x d_sae entries)."""
        return self._train_loss(x, ctx, dense_z=False)

    def _forward_dense(self, x: Tensor, dead_mask: Tensor | None, k_aux: int) -> NestedStep:
        """The dense reference: one dense code, a dense decode per group."""
        pre = self.pre_activations(x)
        z = batch_topk_activation(pre, self.cfg.k)
        recons = self.prefix_reconstructions(z)
        mses = torch.stack([reconstruction_mse(x, r) for r in recons])
        aux = auxk_loss(pre, (x - recons[-1]).detach(), self.W_dec, dead_mask, k_aux)
        return NestedStep(z, mses, recons[-1], aux, z.detach())

    def _forward_sparse(
        self, x: Tensor, dead_mask: Tensor | None, k_aux: int, dense_z: bool
    ) -> NestedStep:
        """The same through sparse_ops: BatchTopK's entries, grouped by prefix (group g: the
        latents in [m_{g-1}, m_g))."""
        pre = self.dense_preacts(x)
        sel = batch_topk_entries(pre, self.cfg.k * x.shape[0])
        bounds = torch.tensor(self.prefix_sizes, device=x.device)
        groups = torch.bucketize(sel[1], bounds, right=True)
        aux = (dead_mask, k_aux, self.cfg.aux_coefficient)
        return self.nested_sparse(x, pre, sel, groups, len(self.prefix_sizes), aux, dense_z)

    def _train_loss(self, x: Tensor, ctx: TrainContext | None, dense_z: bool) -> LossOutput:
        ctx = ctx or TrainContext()
        k_aux = self.cfg.k_aux or max(1, self.cfg.d_in // 2)
        if self.cfg.sparse_kernels and self.sparse_enough(x, self.cfg.k):
            z, mses, x_hat, aux, kept = self._forward_sparse(x, ctx.dead_mask, k_aux, dense_z)
        else:
            z, mses, x_hat, aux, kept = self._forward_dense(x, ctx.dead_mask, k_aux)
        recon_loss = mses.sum()
        if self.cfg.prefix_loss == "mean":
            recon_loss = recon_loss / len(mses)
        loss = recon_loss + self.cfg.aux_coefficient * aux
        if self.training:
            self.update_threshold(kept)
        terms = {f"mse_prefix_{m}": v.item() for m, v in zip(self.prefix_sizes, mses, strict=True)}
        terms.update(
            {"auxk": aux.item(), "fvu": fvu(x, x_hat).item(), "threshold": self.threshold.item()}
        )
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)


# --- paper 28: nested k ---------------------------------------------------------------------------
@dataclass
class MSAEConfig(SAEConfig):
    """``ks``: increasing k_1 < ... < k_h <= d_sae; ``alphas``: one weight per k (default 1 each,
    the paper's uniform weighting)."""

    ks: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    alphas: list[float] | None = None
    inference_topk: bool = False  # False = paper 28: ReLU only at inference
    aux_coefficient: float = 0.0  # not in paper 28's loss; > 0 adds Gao et al.'s AuxK
    k_aux: int | None = None
    sparse_kernels: bool = True  # train through sparse_ops while the code is sparse

    def __post_init__(self) -> None:
        super().__post_init__()
        self.ks = list(self.ks)
        if not self.ks:
            raise ValueError("SAE config: `ks` must be a non-empty list of increasing integers")
        for k in self.ks:
            _check_positive_int("ks", k)
        if any(b <= a for a, b in pairwise(self.ks)):
            raise ValueError(f"SAE config: `ks` must be strictly increasing, got {self.ks}")
        if self.ks[-1] > self.d_sae:
            raise ValueError(f"SAE config: `ks` must not exceed d_sae={self.d_sae}, got {self.ks}")
        if self.alphas is not None:
            self.alphas = [float(a) for a in self.alphas]
            if len(self.alphas) != len(self.ks):
                raise ValueError(
                    f"SAE config: `alphas` needs one weight per entry of `ks` ({len(self.ks)}), "
                    f"got {len(self.alphas)}"
                )
            for a in self.alphas:
                _check_coefficient("alphas", a)
        if self.k_aux is not None:
            _check_positive_int("k_aux", self.k_aux)
        _check_coefficient("aux_coefficient", self.aux_coefficient)

    def weights(self) -> list[float]:
        return self.alphas if self.alphas is not None else [1.0] * len(self.ks)


@register
class MSAE(_UnitNormSAE):
    name = "msae"
    config_class = MSAEConfig
    cfg: MSAEConfig

    def nested_codes(self, pre: Tensor) -> list[Tensor]:
        """z_i = ReLU(TopK_{k_i}(pre)) for every k_i, from one sort (TopK_{k_i} is nested)."""
        values, indices = torch.relu(pre).topk(self.cfg.ks[-1], dim=-1, sorted=True)
        return [
            torch.zeros_like(pre).scatter(-1, indices[:, :k], values[:, :k]) for k in self.cfg.ks
        ]

    def encode(self, x: Tensor) -> Tensor:
        """Training mode (or ``inference_topk``): the largest-k code; eval mode: ReLU(pre)."""
        pre = self.pre_activations(x)
        if self.training or self.cfg.inference_topk:
            return topk_activation(pre, self.cfg.ks[-1])
        return torch.relu(pre)

    def encode_nested(self, x: Tensor) -> list[Tensor]:
        """The codes z_1, ..., z_h, one per k_i (coarse to fine)."""
        return self.nested_codes(self.pre_activations(x))

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        return self._train_loss(x, ctx, dense_z=True)

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss`` with ``z`` (the k_h code) as a sparse COO tensor on the sparse path (the
        dense fallback returns its dense z)."""
        return self._train_loss(x, ctx, dense_z=False)

    def _forward_dense(self, x: Tensor, dead_mask: Tensor | None, k_aux: int) -> NestedStep:
        """The dense reference: a dense code and a dense decode per k_i."""
        pre = self.pre_activations(x)
        codes = self.nested_codes(pre)
        recons = [self.decode(z) for z in codes]
        mses = torch.stack([reconstruction_mse(x, r) for r in recons])
        aux = auxk_loss(pre, (x - recons[-1]).detach(), self.W_dec, dead_mask, k_aux)
        return NestedStep(codes[-1], mses, recons[-1], aux, codes[-1].detach())

    def _forward_sparse(
        self, x: Tensor, dead_mask: Tensor | None, k_aux: int, dense_z: bool
    ) -> NestedStep:
        """The same through sparse_ops: one TopK_{k_h} per token, sorted, whose first k_i
        entries are TopK_{k_i} (group i: the ranks in [k_{i-1}, k_i))."""
        n, k_max = x.shape[0], self.cfg.ks[-1]
        pre = self.dense_preacts(x)
        with torch.no_grad():
            raw, idx = pre.topk(k_max, dim=1, sorted=True)
            rows = torch.arange(n, device=x.device).repeat_interleave(k_max)
            ranks = torch.arange(k_max, device=x.device).repeat(n)
            groups = torch.bucketize(ranks, torch.tensor(self.cfg.ks, device=x.device), right=True)
        sel = (rows, idx.flatten(), raw.flatten())
        aux = (dead_mask, k_aux, self.cfg.aux_coefficient)
        return self.nested_sparse(x, pre, sel, groups, len(self.cfg.ks), aux, dense_z)

    def _train_loss(self, x: Tensor, ctx: TrainContext | None, dense_z: bool) -> LossOutput:
        ctx = ctx or TrainContext()
        k_aux = self.cfg.k_aux or max(1, self.cfg.d_in // 2)
        if self.cfg.sparse_kernels and self.sparse_enough(x, self.cfg.ks[-1]):
            z, mses, x_hat, aux, _ = self._forward_sparse(x, ctx.dead_mask, k_aux, dense_z)
        else:
            z, mses, x_hat, aux, _ = self._forward_dense(x, ctx.dead_mask, k_aux)
        alphas = torch.tensor(self.cfg.weights(), dtype=x.dtype, device=x.device)
        recon_loss = (alphas * mses).sum()
        loss = recon_loss + self.cfg.aux_coefficient * aux
        terms = {f"mse_k{k}": m.item() for k, m in zip(self.cfg.ks, mses, strict=True)}
        terms.update({"auxk": aux.item(), "fvu": fvu(x, x_hat).item()})
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)
