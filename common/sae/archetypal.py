"""Archetypal SAE (A-SAE) and its relaxed variant (RA-SAE) (Fel et al., ICML 2025, paper 18).

The dictionary is tied to the data:

    D      = W C (+ Lambda)        C: (n_candidates, d_in) FIXED data points (a buffer)
                                   W: (d_sae, n_candidates), row-stochastic: W >= 0, W 1 = 1
                                   Lambda: (d_sae, d_in), ||Lambda_i|| <= delta  (RA-SAE only)
    z      = TopK(W_enc^T (x - b_dec) + b_enc)
    x_hat  = z D + b_dec
    L      = ||x - x_hat||^2

so every atom lies in the convex hull of the candidates (A-SAE, ``delta = 0``) or within distance
``delta`` of it (RA-SAE). The paper's claim: this geometric anchoring makes dictionaries far more
stable across training runs (see ``common.evals.stability``) at little reconstruction cost for
RA-SAE.

Choices, following the paper and its reference code (the ``overcomplete`` library):
* Candidates ``C`` are k-means centroids of the data (``candidates="kmeans"``, the paper's choice,
  which shrinks a large data set to ``n_candidates`` representative points); ``"sample"`` takes a
  random subset of the data instead. They are set once, in ``init_from_data``, and saved with the
  weights (a buffer). By default they are raw data points and ``b_dec`` starts at 0, as in the
  reference code (which has no decoder bias), so atoms lie in the hull of the data itself;
  ``centre=True`` starts ``b_dec`` at the data mean and draws C from ``x - mean`` instead
  (advisable when the activations have a large mean, but then the hull of C contains the origin
  and constrains directions much less).
* ``W`` is a plain nonnegative matrix, projected back onto the row-stochastic set after every
  optimizer step (``W <- relu(W); W_i <- W_i / sum(W_i)``), as the reference code does; no softmax.
  It starts one-hot: atom i = candidate ``perm[i]`` (a random permutation, cycled when
  ``d_sae > n_candidates``).
* ``Lambda`` starts at zero and is projected after every step:
  ``Lambda_i <- Lambda_i * min(1, delta / ||Lambda_i||)``.
* Tokens whose norm exceeds ``outlier_norm_ratio`` (default 5) times the sample's median norm are
  not candidates (a departure from the paper, which runs k-means on all the data): k-means would
  keep each such token as its own centroid (see ``init_from_data``). ``math.inf`` keeps them.
* A learned scalar ``exp(log_scale)`` multiplies D (the reference code's ``multiplier``), which
  puts atoms in the conic rather than the convex hull so codes need not compensate for short
  atoms; it does not change any atom's direction. The reference code starts it at 1; here
  (``init_scale``, default) it starts at the least-squares scale of the first reconstructions.
* ``delta`` is in the units of the activations (absolute), as in the reference code.
* The encoder is a TopK SAE's (the paper's experiments use TopK); training runs through the TopK
  SAE's sparse kernels, so only the encoder matmul and the product W C are dense.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from common.sae.base import SAE, LossOutput, SAEConfig, TrainContext, fvu, reconstruction_mse
from common.sae.registry import register
from common.sae.sparse_ops import selected_preacts, sparse_decode, topk_preacts
from common.sae.sparsity import topk_activation

CANDIDATE_METHODS = ("kmeans", "sample")


@dataclass
class ArchetypalConfig(SAEConfig):
    k: int = 32
    n_candidates: int = 1024
    delta: float = 0.0  # must be 0 for `archetypal`; the relaxation radius for `ra`
    candidates: str = "kmeans"  # how C is drawn from the data: "kmeans" (paper) or "sample"
    kmeans_iterations: int = 25
    centre: bool = False  # True: C from x - mean and b_dec starts at the mean
    outlier_norm_ratio: float = 5.0  # tokens above this many median norms are not candidates
    init_scale: bool = True  # log_scale starts at the least-squares scale of the first recons
    relaxed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("k", "n_candidates", "kmeans_iterations"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"archetypal config: `{name}` must be a positive integer, got {value!r}"
                )
        if self.k > self.d_sae:
            raise ValueError(f"archetypal config: `k` ({self.k}) must be <= `d_sae` ({self.d_sae})")
        ratio = self.outlier_norm_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not ratio >= 1:
            raise ValueError(
                "archetypal config: `outlier_norm_ratio` must be a number >= 1 (math.inf keeps "
                f"every point), got {ratio!r}"
            )
        if self.candidates not in CANDIDATE_METHODS:
            raise ValueError(
                f"archetypal config: `candidates` must be one of {CANDIDATE_METHODS}, "
                f"got {self.candidates!r}"
            )
        if self.relaxed and not self.delta > 0:
            raise ValueError(
                f"ra config: `delta` must be > 0 (it is the relaxation radius), got {self.delta}; "
                "use architecture 'archetypal' for delta = 0"
            )
        if not self.relaxed and self.delta != 0:
            raise ValueError(
                f"archetypal config: `delta` must be 0 for 'archetypal', got {self.delta}; "
                "use architecture 'ra' for the relaxed variant"
            )


@dataclass
class RelaxedArchetypalConfig(ArchetypalConfig):
    relaxed: ClassVar[bool] = True
    delta: float = 1.0


def kmeans(x: Tensor, n_clusters: int, iterations: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means: centroids mu_c minimising sum_n min_c ||x_n - mu_c||^2.

    Starts from ``n_clusters`` distinct random points; an empty cluster is re-seeded with the
    point currently farthest from its centroid.
    """
    if n_clusters > len(x):
        raise ValueError(
            f"n_candidates ({n_clusters}) exceeds the {len(x)} points of the init sample; lower "
            "`n_candidates` or raise the trainer's `init_sample`"
        )
    centroids = x[torch.randperm(len(x), generator=generator)[:n_clusters]].clone()
    for _ in range(iterations):
        dist = torch.cdist(x, centroids)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=n_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            far = dist.gather(1, assign[:, None]).squeeze(1).topk(int(empty.sum())).indices
            centroids[empty] = x[far]
    return centroids


@register
class ArchetypalSAE(SAE):
    name = "archetypal"
    config_class = ArchetypalConfig
    cfg: ArchetypalConfig

    def __init__(self, cfg: ArchetypalConfig) -> None:
        super().__init__(cfg)
        n, d_sae, d_in = cfg.n_candidates, cfg.d_sae, cfg.d_in
        # W_enc is (d_in, d_sae) as in SAELens, the transpose of a (d_sae, d_in) block (as in topk).
        self.W_enc = nn.Parameter(torch.randn(d_sae, d_in).div_(d_in**0.5).t())
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        choice = torch.randperm(n).repeat(d_sae // n + 1)[:d_sae]
        self.W = nn.Parameter(torch.zeros(d_sae, n).scatter(1, choice[:, None], 1.0))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.register_buffer("C", torch.zeros(n, d_in))
        if cfg.delta > 0:
            self.Lambda = nn.Parameter(torch.zeros(d_sae, d_in))

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Set C from the sample, start the encoder at D^T and fit the scale of D.

        1. Tokens whose norm (of ``x - mean`` if centred) exceeds ``outlier_norm_ratio`` times the
           median are left out; C is then the k-means centroids of (or a random subset of) the
           rest. Real residual streams hold a few tokens at ~100x the median norm; k-means keeps
           each as its own centroid, and an atom on such a candidate moves ~100x further per
           step of W than the others (A-SAE and RA-SAE then diverged on SmolLM2: eval FVU ~3e6).
        2. W_enc = the unit-normalised transpose of the initial dictionary.
        3. ``init_scale``: log_scale = log c with the least-squares c = <x - b_dec, r> / ||r||^2,
           r the first reconstructions. When the data has a large mean (LM activations), every
           candidate carries it, so the k active atoms add up to ~k times the input (FVU ~1e5 at
           step 0) and lr-1e-3 Adam steps on log_scale take hundreds of steps to undo that.
           Cost on the toy data (no mean; first reconstructions ~5x too large, which training
           undoes): ground-truth MMCS 0.90-0.92 instead of 0.97 for A-SAE and 0.96-0.97 instead
           of 0.99 for RA-SAE over three seeds (400 steps of 256); ``init_scale=False`` keeps the
           reference code's start. (Fitting the scale of W_enc instead, as ``topk`` does, gave
           MMCS 0.89-0.90.)
        """
        if self.cfg.centre:
            self.b_dec.copy_(x.mean(0))
        norms = (x - self.b_dec).norm(dim=1)
        x = x[norms <= self.cfg.outlier_norm_ratio * norms.median()]
        points = x - self.b_dec
        g = torch.Generator().manual_seed(self.cfg.seed)
        n = self.cfg.n_candidates
        if n > len(points):
            raise ValueError(
                f"n_candidates ({n}) exceeds the {len(points)} points of the init sample (outliers "
                "left out); lower `n_candidates` or raise the trainer's `init_sample`"
            )
        if self.cfg.candidates == "kmeans":
            self.C.copy_(kmeans(points, n, self.cfg.kmeans_iterations, g))
        else:
            self.C.copy_(points[torch.randperm(len(points), generator=g)[:n]])
        d = self.dictionary
        self.W_enc.copy_((d / d.norm(dim=1, keepdim=True).clamp_min(1e-8)).t())
        if self.cfg.init_scale:
            recon = self.decode(self.encode(x)) - self.b_dec
            scale = (points * recon).sum() / recon.pow(2).sum().clamp_min(1e-12)
            if torch.isfinite(scale) and scale > 0:
                self.log_scale.add_(scale.log())

    @property
    def dictionary(self) -> Tensor:
        """D = exp(log_scale) * (W C + Lambda), shape (d_sae, d_in)."""
        d = self.W @ self.C
        if self.cfg.delta > 0:
            d = d + self.Lambda
        return d * self.log_scale.exp()

    @property
    def decoder_directions(self) -> Tensor:
        return self.dictionary

    def encode(self, x: Tensor) -> Tensor:
        """z = TopK(W_enc^T (x - b_dec) + b_enc), dense (batch, d_sae)."""
        return topk_activation(torch.addmm(self.b_enc, x - self.b_dec, self.W_enc), self.cfg.k)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.dictionary + self.b_dec

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """||x - x_hat||^2 through the TopK SAE's sparse kernels (``common.sae.sparse_ops``).

        Same values and gradients as ``decode(encode(x))``; only the encoder's forward matmul is
        dense, and D is formed once per step.
        """
        n, k = x.shape[0], self.cfg.k
        with torch.no_grad():
            pre, idx, _, _ = topk_preacts(x, self.W_enc, self.b_enc, self.b_dec, k)
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        cols = idx.flatten()
        code = torch.relu(
            selected_preacts(x, self.W_enc, self.b_enc, self.b_dec, rows, cols, pre.flatten())
        )
        x_hat = sparse_decode(code, rows, cols, self.dictionary, n) + self.b_dec
        z = x.new_zeros(n, self.cfg.d_sae).index_put_((rows, cols), code.detach())
        mse = reconstruction_mse(x, x_hat)
        terms = {"mse": mse.item(), "fvu": fvu(x, x_hat).item()}
        return LossOutput(loss=mse, x_hat=x_hat, z=z, terms=terms)

    @torch.no_grad()
    def after_step(self) -> None:
        """Project back onto the constraint set: W row-stochastic, ||Lambda_i|| <= delta."""
        w = self.W.data.clamp_(min=0)
        row_sum = w.sum(1, keepdim=True)
        # A row the step pushed entirely below zero restarts as the uniform mixture.
        w.copy_(torch.where(row_sum > 0, w / row_sum.clamp_min(1e-12), 1.0 / w.shape[1]))
        if self.cfg.delta > 0:
            norms = self.Lambda.data.norm(dim=1, keepdim=True)
            self.Lambda.data.mul_((self.cfg.delta / norms.clamp_min(1e-12)).clamp(max=1.0))


@register
class RelaxedArchetypalSAE(ArchetypalSAE):
    """RA-SAE: D = W C + Lambda with ||Lambda_i|| <= delta (see the module docstring)."""

    name = "ra"
    config_class = RelaxedArchetypalConfig
    cfg: RelaxedArchetypalConfig
