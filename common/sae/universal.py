"""Universal SAE (Thasarathan et al., ICML 2025, paper 21: "Universal Sparse Autoencoders:
Interpretable Cross-Model Concept Alignment").

One TopK code of ``d_sae`` = S latents is shared by M models. A batch of *paired* activations (row
n of every model comes from the same input) is their concatenation

    x = [A_1 | A_2 | ... | A_M],   A_m of width d_m (``d_models``),   d_in = sum_m d_m.

Model m has an encoder ``W_enc[m]`` (d_m, S), ``b_enc[m]`` (S,) and a decoder block
D_m = ``W_dec[:, cols_m]`` (S, d_m) with bias b_m = ``b_dec[cols_m]`` (the paper's b_pre_m,
subtracted before encoding and added after decoding):

    Z_i     = Psi_i(A_i) = TopK_k(ReLU(W_enc_i^T (A_i - b_i) + b_enc_i))
    A_hat_j = Z_i D_j + b_j                            (the code of model i decoded as model j)

Training (Sec. 3 of the paper): every step draws one model i, encodes its activations and
reconstructs *every* model's activations of the same inputs from that one code,

    L = sum_j mean_n || A_j,n - Z_i,n D_j - b_j ||^2 = mean_n || x_n - decode(encode(x_n, i)) ||^2.

The draw is uniform and deterministic in (seed, step) (``model_for_step``), so a resumed run draws
the same models as an uninterrupted one. Only encoder i is in the graph of the step: the other
encoders get no gradient (``None``, not zeros), so Adam leaves their weights *and* moments
untouched that step, as with the separate per-model parameters of the paper's reference code.

Decoder: ``W_dec`` (S, d_in) holds the M decoders side by side, row s = [D_1[s] | ... | D_M[s]], and
each row is kept at unit norm *jointly* (``after_step``; no tangent-gradient projection before the
step), so a latent may spend its norm on one model (model-specific) or spread it over several
(universal). Initialisation: random unit joint rows, each encoder the transpose of its decoder
block (tied), ``b_enc = 0``, ``b_dec`` = the data mean (``init_from_data``).

The standard interface is defined on the concatenation: ``encode(x)`` and ``forward(x)`` use model
0's encoder (the first block of x; ``encode(x, model=i)`` takes any other) and ``decode(z)``
returns every model's reconstruction, concatenated (B, d_in); ``decode(z, model=j)`` returns model
j's alone. So ``common.evals`` on the concatenated activations reports the reconstruction of all
models from model 0, and ``decoder_directions`` are the joint rows of ``W_dec``.

Scale: each term of L is in its model's own units, so standardise each model first (paper 21
centres and scales every model to E||A_m - mu_m||^2 = 1) or a wide or large model dominates; the
scalar ``input_scale`` (the trainer's ``normalize_activations``) scales all models alike.
"""

from __future__ import annotations

import hashlib
import numbers
from collections.abc import Sequence
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
    unit_norm_rows_,
)
from common.sae.registry import register
from common.sae.sparsity import topk_activation


@dataclass
class UniversalConfig(SAEConfig):
    # Widths of the M models, in the order of their blocks in x; they must sum to d_in.
    # None: one model of width d_in (M = 1, a TopK SAE); a universal SAE needs two or more.
    d_models: list[int] | None = None
    k: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or isinstance(self.k, bool) or not 0 < self.k <= self.d_sae:
            raise ValueError(
                f"SAE config: `k` must be an integer in [1, d_sae={self.d_sae}], got {self.k!r}"
            )
        if self.d_models is None:
            self.d_models = [self.d_in]
        widths = self.d_models
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
            raise ValueError(
                "SAE config: `d_models` must be a non-empty list of the models' widths (one "
                f"positive integer per model, in the order of their columns), got {widths!r}"
            )
        if not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in widths):
            raise ValueError(f"SAE config: `d_models` must hold integers, got {list(widths)!r}")
        widths = [int(w) for w in widths]
        if min(widths) <= 0:
            raise ValueError(f"SAE config: every width in `d_models` must be > 0, got {widths}")
        if sum(widths) != self.d_in:
            raise ValueError(
                f"SAE config: `d_models` {widths} sum to {sum(widths)}, but d_in is {self.d_in}. "
                "A universal SAE reads the models' paired activations side by side, "
                "x = [A_1 | ... | A_M], so d_in (the width of the training data) must be the sum "
                "of the widths: pass one width per block of x, or concatenate all the models."
            )
        self.d_models = widths  # a list, as it reads back from config.json


@register
class UniversalSAE(SAE):
    """M encoders into one TopK code of ``d_sae`` latents and M decoder blocks out of it."""

    name = "universal"
    config_class = UniversalConfig
    cfg: UniversalConfig

    def __init__(self, cfg: UniversalConfig) -> None:
        super().__init__(cfg)
        widths = self.d_models
        w_dec = torch.cat([torch.randn(cfg.d_sae, d) for d in widths], dim=1)
        unit_norm_rows_(w_dec)  # joint unit rows over all models
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.ParameterList(
            [nn.Parameter(block.t().contiguous()) for block in w_dec.split(widths, dim=1)]
        )
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(cfg.d_sae)) for _ in widths])
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        starts = [sum(widths[:m]) for m in range(len(widths))]
        self._slices = [slice(s, s + d) for s, d in zip(starts, widths, strict=True)]

    # --- the models' blocks ------------------------------------------------------------------
    @property
    def d_models(self) -> list[int]:
        """The models' widths d_1, ..., d_M (``cfg.d_models``)."""
        return list(self.cfg.d_models or [self.cfg.d_in])

    @property
    def n_models(self) -> int:
        """M, the number of models sharing the code."""
        return len(self.d_models)

    def model_slice(self, model: int) -> slice:
        """The columns cols_m of model ``model`` in x, ``W_dec`` and ``b_dec``."""
        self._check_model(model)
        return self._slices[model]

    def split(self, x: Tensor) -> list[Tensor]:
        """[A_1, ..., A_M] (views) from the concatenation x (..., d_in)."""
        self._check_width(x)
        return list(x.split(self.d_models, dim=-1))

    def decoder_of(self, model: int) -> Tensor:
        """D_m = W_dec[:, cols_m], shape (d_sae, d_m): latent directions in model m's space."""
        return self.W_dec[:, self.model_slice(model)]

    def model_input(self, x: Tensor, model: int) -> Tensor:
        """A_m from ``x``: x itself if it has model m's width d_m, its block cols_m if it is the
        concatenation of all models (width d_in)."""
        sl, width = self.model_slice(model), x.shape[-1]
        if width == self.d_models[model]:
            return x
        if width == self.cfg.d_in:
            return x[..., sl]
        raise ValueError(
            f"universal SAE: activations of width {width} given for model {model}, whose width is "
            f"{self.d_models[model]}: pass model {model}'s own activations (width "
            f"{self.d_models[model]}) or the concatenation of all models (width d_in="
            f"{self.cfg.d_in}, widths {self.d_models})."
        )

    def _check_model(self, model: int) -> None:
        if not isinstance(model, int) or isinstance(model, bool) or not 0 <= model < self.n_models:
            raise ValueError(
                f"universal SAE: model must be an integer in [0, {self.n_models - 1}] (one of its "
                f"{self.n_models} models, widths {self.d_models}), got {model!r}"
            )

    def _check_width(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"universal SAE: expected the concatenated activations of all models, width "
                f"d_in={self.cfg.d_in} (widths {self.d_models}), got shape {tuple(x.shape)}."
            )

    # --- the interface -----------------------------------------------------------------------
    def pre_activations(self, x: Tensor, model: int = 0) -> Tensor:
        """W_enc_m^T (A_m - b_m) + b_enc_m, shape (B, d_sae); x is A_m or the concatenation."""
        a = self.model_input(x, model)
        return torch.addmm(
            self.b_enc[model], a - self.b_dec[self.model_slice(model)], self.W_enc[model]
        )

    def encode(self, x: Tensor, model: int = 0) -> Tensor:
        """Z = Psi_m(A_m) = TopK_k(ReLU(pre)) with model ``model``'s encoder (default: model 0)."""
        return topk_activation(self.pre_activations(x, model), self.cfg.k)

    def decode(self, z: Tensor, model: int | None = None) -> Tensor:
        """A_hat_j = Z D_j + b_j for ``model`` = j, shape (B, d_j); for ``None`` every model's
        reconstruction side by side, Z W_dec + b_dec, shape (B, d_in)."""
        if model is None:
            return torch.addmm(self.b_dec, z, self.W_dec)
        sl = self.model_slice(model)
        return torch.addmm(self.b_dec[sl], z, self.W_dec[:, sl])

    def forward(self, x: Tensor, model: int = 0) -> Tensor:
        """Every model reconstructed from the code of model ``model`` (default 0), (B, d_in)."""
        return self.decode(self.encode(x, model))

    def model_for_step(self, step: int) -> int:
        """The model i whose encoder step ``step`` trains: uniform over the M models and a function
        of (seed, step) only (a hash, no random state), so resuming replays the same draws."""
        if self.n_models == 1:
            return 0
        digest = hashlib.blake2b(f"{self.cfg.seed}:{step}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.n_models

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """L = sum_j mean_n ||A_j - Psi_i(A_i) D_j - b_j||^2 with i = ``model_for_step(ctx.step)``
        (see ``loss_from``); ``ctx.dead_mask`` is not used (no auxiliary loss)."""
        ctx = ctx or TrainContext()
        return self.loss_from(x, self.model_for_step(ctx.step))

    def loss_from(self, x: Tensor, model: int) -> LossOutput:
        """The USAE loss of the concatenated batch ``x`` (B, d_in) encoded from ``model`` = i:

            L = sum_j mean_n || A_j,n - Psi_i(A_i,n) D_j - b_j ||^2 = mean_n ||x_n - x_hat_n||^2

        with x_hat = decode(encode(x, i)). Terms: ``mse`` (= L), ``fvu`` of the concatenation,
        ``encoder`` (= i) and ``mse_model{j}``, model j's term of the sum."""
        self._check_width(x)
        z = self.encode(x, model)
        x_hat = self.decode(z)
        loss = reconstruction_mse(x, x_hat)
        terms = {"mse": loss.item(), "encoder": float(model)}
        with torch.no_grad():
            terms["fvu"] = fvu(x, x_hat).item()
            err = (x - x_hat).pow(2).sum(0) / x.shape[0]  # per column, mean over the batch
            for j, part in enumerate(err.split(self.d_models)):
                terms[f"mse_model{j}"] = part.sum().item()
        return LossOutput(loss=loss, x_hat=x_hat, z=z, terms=terms)

    @torch.no_grad()
    def after_step(self) -> None:
        """Rescale each latent's joint decoder row [D_1[s] | ... | D_M[s]] to unit norm."""
        unit_norm_rows_(self.W_dec.data)


def concat_models(xs: Sequence[Tensor]) -> Tensor:
    """x = [A_1 | ... | A_M] from paired activations ``xs[m]`` (N, d_m), the universal SAE's input;
    a ValueError unless every model has the same number of rows (row n = input n for all)."""
    if not xs:
        raise ValueError("concat_models needs the activations of at least one model")
    rows = [len(x) for x in xs]
    if len(set(rows)) != 1:
        raise ValueError(
            f"the models' activations must be paired (row n of every model from input n), but "
            f"they have {rows} rows: extract every model on the same inputs, in the same order."
        )
    return torch.cat(list(xs), dim=1)
