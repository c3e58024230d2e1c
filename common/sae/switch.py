"""Switch SAE: a router sends each token to one of several small TopK SAEs (Mudide et al., paper 9).

    p(x)   = softmax(W_router^T (x - b_router))                      (n_experts probabilities)
    e(x)   = argmax_i p_i(x)                                         (the one expert that runs)
    a(x)   = TopK(W_enc[:, S_e]^T (x - b_dec))                       (S_e: expert e's latents)
    x_hat  = p_e(x) * W_dec[S_e]^T a(x) + b_dec
    L      = ||x - x_hat||^2 + alpha * d_in * N * sum_i f_i P_i

``f_i`` is the fraction of the batch routed to expert i (no gradient) and ``P_i`` the mean router
probability of expert i; N * sum_i f_i P_i is 1 when tokens are spread evenly and N when one expert
takes everything (the Switch Transformer load-balancing loss). Scaling the reconstruction by
``p_e(x)`` is what gives the router a gradient from the MSE. The extra factor ``d_in`` follows the
authors' code (``lb_alpha * activation_dim * lb_loss``): our MSE is summed over the ``d_in``
features, so ``alpha`` keeps the meaning of a per-feature weight.

Each expert has ``d_sae / n_experts`` latents. Only the routed expert's encoder runs: tokens are
gathered per expert and encoded with that expert's slice of ``W_enc`` (this is the paper's point:
the dense encoder is the compute bottleneck). ``encode`` still returns the dense
``(batch, d_sae)`` code ``p_e(x) * a(x)`` placed in the expert's slice (zeros elsewhere), so
``decode(encode(x)) == forward(x)`` and every evaluation treats this SAE like any other.
Decoder rows are unit norm (projected after each step; the gradient along each row is removed
before it). The encoder starts as the decoder's transpose and ``b_router`` at the data mean, as in
the authors' code.
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
from common.sae.sparse_ops import sparse_decode


@dataclass
class SwitchConfig(SAEConfig):
    n_experts: int = 8
    k: int = 32
    load_balance_coefficient: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_experts", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"switch config: `{name}` must be a positive integer, got {value!r}"
                )
        if self.d_sae % self.n_experts != 0:
            raise ValueError(
                f"switch config: `d_sae` ({self.d_sae}) must be divisible by `n_experts` "
                f"({self.n_experts}); pick d_sae = n_experts * expert width"
            )
        if self.k > self.d_sae // self.n_experts:
            raise ValueError(
                f"switch config: `k` ({self.k}) exceeds the expert width d_sae / n_experts = "
                f"{self.d_sae // self.n_experts}; lower k or use fewer experts"
            )
        if not self.load_balance_coefficient >= 0:
            raise ValueError(
                f"switch config: `load_balance_coefficient` must be >= 0, got "
                f"{self.load_balance_coefficient}"
            )


class Routed(NamedTuple):
    """One forward pass of the sparse computation: who went where, and the k active latents."""

    probs: Tensor  # (batch, n_experts) router softmax
    expert: Tensor  # (batch,) chosen expert
    top_values: Tensor  # (batch, k) p_e(x) * TopK values, >= 0
    top_indices: Tensor  # (batch, k) global latent indices (inside the expert's slice)


@register
class SwitchSAE(UnitNormDecoderSAE):
    name = "switch"
    config_class = SwitchConfig
    cfg: SwitchConfig

    def __init__(self, cfg: SwitchConfig) -> None:
        super().__init__(cfg)
        self.expert_width = cfg.d_sae // cfg.n_experts
        w = torch.randn(cfg.d_sae, cfg.d_in)
        unit_norm_rows_(w)
        self.W_enc = nn.Parameter(w.t().clone())  # (d_in, d_sae); expert i owns columns S_i
        self.W_dec = nn.Parameter(w.clone())  # (d_sae, d_in); expert i owns rows S_i
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.W_router = nn.Parameter(torch.randn(cfg.d_in, cfg.n_experts) / cfg.d_in**0.5)
        self.b_router = nn.Parameter(torch.zeros(cfg.d_in))

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """b_dec = b_router = mean of the sample (the authors use the geometric median)."""
        self.b_dec.copy_(x.mean(0))
        self.b_router.copy_(x.mean(0))

    def router_probs(self, x: Tensor) -> Tensor:
        """p(x) = softmax(W_router^T (x - b_router)), shape (batch, n_experts)."""
        return torch.softmax((x - self.b_router) @ self.W_router, dim=-1)

    def route(self, x: Tensor) -> Routed:
        """Route every token to its argmax expert and run only that expert's TopK encoder.

        Tokens are sorted by expert once, so each expert encodes one contiguous block.
        """
        probs = self.router_probs(x)
        p_top, expert = probs.max(dim=-1)
        order = torch.argsort(expert, stable=True)
        counts = torch.bincount(expert, minlength=self.cfg.n_experts).tolist()
        blocks = (x - self.b_dec)[order].split(counts)
        values, indices = [], []
        for i, block in enumerate(blocks):
            start = i * self.expert_width
            pre = block @ self.W_enc[:, start : start + self.expert_width]
            v, j = torch.relu(pre).topk(self.cfg.k, dim=-1, sorted=False)
            values.append(v)
            indices.append(j + start)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=x.device)
        top_values = torch.cat(values)[inverse] * p_top[:, None]
        return Routed(probs, expert, top_values, torch.cat(indices)[inverse])

    def _dense(self, routed: Routed) -> Tensor:
        z = routed.top_values.new_zeros(routed.top_values.shape[0], self.cfg.d_sae)
        return z.scatter(-1, routed.top_indices, routed.top_values)

    def _sparse_decode(self, routed: Routed) -> Tensor:
        """x_hat = sum_j value_j * W_dec[index_j] + b_dec: k rows per token, not d_sae."""
        n, k = routed.top_indices.shape
        rows = torch.arange(n, device=routed.top_indices.device).repeat_interleave(k)
        flat = routed.top_values.flatten()
        return sparse_decode(flat, rows, routed.top_indices.flatten(), self.W_dec, n) + self.b_dec

    def encode(self, x: Tensor) -> Tensor:
        return self._dense(self.route(x))

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self._sparse_decode(self.route(x))

    def load_balance_loss(self, routed: Routed) -> Tensor:
        """N * sum_i f_i P_i (Fedus et al.'s Switch Transformer loss; 1 when perfectly balanced)."""
        n = self.cfg.n_experts
        fraction = torch.bincount(routed.expert, minlength=n).float() / routed.expert.numel()
        return n * (fraction * routed.probs.mean(0)).sum()

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        routed = self.route(x)
        x_hat = self._sparse_decode(routed)
        mse = reconstruction_mse(x, x_hat)
        balance = self.load_balance_loss(routed)
        loss = mse + self.cfg.load_balance_coefficient * self.cfg.d_in * balance
        share = torch.bincount(routed.expert, minlength=self.cfg.n_experts).float() / x.shape[0]
        terms = {
            "mse": mse.item(),
            "load_balance": balance.item(),
            "max_expert_share": share.max().item(),
            "fvu": fvu(x, x_hat).item(),
        }
        z = self._dense(routed._replace(top_values=routed.top_values.detach()))
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)
