"""Universal sparse autoencoders (paper 21: Thasarathan et al., ICML 2025, "Universal Sparse
Autoencoders: Interpretable Cross-Model Concept Alignment").

One sparse code Z is shared by M models. Model i has an encoder Psi_i and a decoder D_i:

    Z_i     = Psi_i(A_i) = TopK_k(ReLU(W_enc_i^T (A_i - b_pre_i) + b_enc_i))
    A_hat_j = Z_i D_j + b_pre_j                         (decode the code of model i as model j)

Training (Sec. 3 of the paper): every step draws one model i at random, encodes its activations of
a batch of inputs and reconstructs *every* model's activations of the same inputs from that code,

    L = sum_j || A_j - Psi_i(A_i) D_j ||_F^2 .

Activations are standardised per model (centred, scaled so E||A_j - mu_j||^2 = 1 on the training
set), so each term of L is a fraction of variance and no model dominates because it is wider.

Evaluation: the cross-reconstruction matrix FVU[i, j] (encode with i, decode to j), per-latent
co-firing (a latent that fires for model i on an image also fires for model j on the same image)
and firing entropy (how evenly a latent's firings are spread over the models), against a USAE
trained with the image pairing between models shuffled, and against independent SAEs joined by a
post-hoc linear map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from common.evals.reconstruction import reconstruction_metrics
from common.models.clip_style import to_pixels
from common.models.loading import LoadedModel
from common.models.sites import resolve_site
from common.sae.sparsity import topk_activation


# --- activations ----------------------------------------------------------------------------------
@torch.inference_mode()
def pooled_site_activations(
    loaded: LoadedModel,
    images: Tensor,
    sites: Sequence[str],
    image_size: int,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Per-image mean over spatial positions of each CNN site: {site: (N, C_site)}.

    A spatial site (B, C, H, W) gives one token per position (``common.models.sites``); pooling
    them, a_n = (1 / HW) sum_{h,w} x_n[:, h, w], gives one vector per image and per site. All sites
    come from one forward pass of ``loaded.model`` (an EfficientNet) at ``image_size`` pixels.
    """
    if not hasattr(loaded.model, "extract_features"):
        raise TypeError(f"{loaded.name} is not an EfficientNet: load 'efficientnet-lite0'")
    if len(set(sites)) != len(sites) or not sites:
        raise ValueError(f"sites must be distinct and non-empty, got {list(sites)}")
    store: dict[str, list[Tensor]] = {s: [] for s in sites}
    handles = []
    for site in sites:
        resolved = resolve_site(loaded.model, site)
        if resolved.layout != "spatial":
            raise ValueError(f"site {site!r} is not a spatial CNN site")
        handles.append(resolved.register(lambda x, s=site: store[s].append(x.mean((2, 3)))))
    try:
        model = loaded.model.to(memory_format=torch.channels_last)
        for start in range(0, len(images), batch_size):
            x = to_pixels(images[start : start + batch_size], image_size)
            x = loaded.preprocess(x).contiguous(memory_format=torch.channels_last)
            model.extract_features(x)
    finally:
        for h in handles:
            h.remove()
    return {s: torch.cat(v).float() for s, v in store.items()}


@dataclass
class Standardizer:
    """x -> (x - mean) * scale with scale = 1 / sqrt(E||x - mean||^2) fitted on training data."""

    mean: Tensor
    scale: float

    @classmethod
    def fit(cls, x: Tensor) -> Standardizer:
        mean = x.mean(0)
        return cls(mean, float(1.0 / (x - mean).pow(2).sum(1).mean().sqrt().clamp_min(1e-12)))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) * self.scale


# --- the model ------------------------------------------------------------------------------------
class UniversalSAE(nn.Module):
    """M encoders into one TopK code of ``d_sae`` latents and M decoders out of it.

    Parameters per model m (widths ``d_ins[m]``): ``W_enc[m]`` (d_m, S), ``b_enc[m]`` (S,),
    ``W_dec[m]`` (S, d_m) and ``b_pre[m]`` (d_m,). The decoder rows of latent s over all models,
    [W_dec[0][s], ..., W_dec[M-1][s]], are kept at unit norm *jointly*, so a latent may put its
    energy in one model (model-specific) or spread it over several (universal).
    """

    def __init__(self, d_ins: Sequence[int], d_sae: int, k: int, seed: int = 0) -> None:
        super().__init__()
        if len(d_ins) < 2:
            raise ValueError(f"a universal SAE needs at least 2 models, got widths {list(d_ins)}")
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.d_ins, self.d_sae, self.k = list(d_ins), d_sae, k
        g = torch.Generator().manual_seed(seed)
        dec = [torch.randn(d_sae, d, generator=g) for d in d_ins]
        norm = torch.cat(dec, 1).norm(dim=1, keepdim=True)
        self.W_dec = nn.ParameterList([nn.Parameter(w / norm) for w in dec])
        # tied initialisation: the encoder of model m starts as its decoder's transpose
        self.W_enc = nn.ParameterList([nn.Parameter(w.detach().T.clone()) for w in self.W_dec])
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(d_sae)) for _ in d_ins])
        self.b_pre = nn.ParameterList([nn.Parameter(torch.zeros(d)) for d in d_ins])

    @property
    def n_models(self) -> int:
        return len(self.d_ins)

    def pre_activations(self, x: Tensor, i: int) -> Tensor:
        """W_enc_i^T (x - b_pre_i) + b_enc_i, shape (B, S)."""
        return (x - self.b_pre[i]) @ self.W_enc[i] + self.b_enc[i]

    def encode(self, x: Tensor, i: int) -> Tensor:
        """Z = Psi_i(x) = TopK_k(ReLU(pre)) for activations ``x`` (B, d_i) of model i."""
        return topk_activation(self.pre_activations(x, i), self.k)

    def decode(self, z: Tensor, j: int) -> Tensor:
        """A_hat_j = Z D_j + b_pre_j, shape (B, d_j)."""
        return z @ self.W_dec[j] + self.b_pre[j]

    def loss(self, xs: Sequence[Tensor], i: int) -> tuple[Tensor, Tensor]:
        """(L, per-model terms): L = sum_j mean_n ||A_j,n - Psi_i(A_i,n) D_j||^2 (paired rows)."""
        z = self.encode(xs[i], i)
        terms = torch.stack(
            [(x - self.decode(z, j)).pow(2).sum(-1).mean() for j, x in enumerate(xs)]
        )
        return terms.sum(), terms.detach()

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each latent's joint decoder row [W_dec[0][s], ..., W_dec[M-1][s]] to norm 1."""
        norm = torch.cat(list(self.W_dec), 1).norm(dim=1, keepdim=True).clamp_min(1e-8)
        for w in self.W_dec:
            w.div_(norm)

    @torch.no_grad()
    def init_from_data(self, xs: Sequence[Tensor]) -> None:
        """b_pre_m <- mean of model m's activations (the paper's b_pre: a geometric centre)."""
        for b, x in zip(self.b_pre, xs, strict=True):
            b.copy_(x.mean(0))


@dataclass
class USAETrainResult:
    model: UniversalSAE
    losses: list[float]  # L per step
    picked: list[int]  # the model i encoded at each step


def train_usae(
    xs: Sequence[Tensor],
    d_sae: int,
    k: int,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    warmup_steps: int = 0,
    decay_fraction: float = 0.2,
    grad_clip: float = 1.0,
) -> USAETrainResult:
    """Train a ``UniversalSAE`` on paired rows ``xs[m]`` (N, d_m), the paper's random-encoder step.

    Step t: draw a batch of rows and one model i uniformly; minimise L = sum_j ||A_j - Psi_i(A_i)
    D_j||^2 with Adam (linear warm-up, linear decay over the last ``decay_fraction`` of steps);
    after each step the joint decoder rows are projected back to unit norm. Every parameter with a
    gradient (encoder i, all decoders) is updated; the reference code steps only model i's
    optimiser, which in expectation over i updates the same parameters.
    """
    n = len(xs[0])
    if any(len(x) != n for x in xs):
        raise ValueError(f"xs must be paired (same number of rows), got {[len(x) for x in xs]}")
    torch.manual_seed(seed)
    model = UniversalSAE([x.shape[1] for x in xs], d_sae, k, seed)
    model.init_from_data(xs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    decay = int(decay_fraction * steps)
    losses, picked = [], []
    for step in range(steps):
        factor = 1.0
        if warmup_steps > 0:
            factor = min(factor, (step + 1) / warmup_steps)
        if decay > 0:
            factor = min(factor, (steps - step) / decay)
        for group in opt.param_groups:
            group["lr"] = lr * factor
        idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
        i = int(torch.randint(0, model.n_models, (1,), generator=g))
        loss, _ = model.loss([x[idx] for x in xs], i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        model.normalize_decoder_()
        losses.append(float(loss.detach()))
        picked.append(i)
    model.eval()
    return USAETrainResult(model, losses, picked)


def shuffle_pairing(xs: Sequence[Tensor], seed: int) -> list[Tensor]:
    """The control: rows of every model but the first permuted, so row n of model 0 and row n of
    model m come from different images; each model's own distribution is unchanged."""
    g = torch.Generator().manual_seed(seed)
    return [xs[0]] + [x[torch.randperm(len(x), generator=g)] for x in xs[1:]]


# --- measures -------------------------------------------------------------------------------------
@torch.no_grad()
def codes(model: UniversalSAE, xs: Sequence[Tensor]) -> list[Tensor]:
    """Z_i = Psi_i(A_i) for every model i: a list of (N, S) codes of the same N inputs."""
    return [model.encode(x, i) for i, x in enumerate(xs)]


@torch.no_grad()
def cross_reconstruction_fvu(model: UniversalSAE, xs: Sequence[Tensor]) -> np.ndarray:
    """FVU[i, j] = sum_n ||A_j,n - Psi_i(A_i,n) D_j||^2 / sum_n ||A_j,n - mean_n A_j||^2.

    The diagonal is self-reconstruction, the rest cross-reconstruction (the paper's Fig. 3 shows
    R^2 = 1 - FVU). FVU is invariant to each model's standardisation scale.
    """
    m = model.n_models
    out = np.zeros((m, m))
    for i, z in enumerate(codes(model, xs)):
        for j, x in enumerate(xs):
            out[i, j] = reconstruction_metrics(x, model.decode(z, j))["fvu"]
    return out


def off_diagonal_mean(matrix: np.ndarray) -> float:
    """Mean of the entries with i != j (the cross-reconstruction average)."""
    mask = ~np.eye(matrix.shape[0], dtype=bool)
    return float(matrix[mask].mean())


def cofiring(zs: Sequence[Tensor], min_fires: int = 1) -> dict[str, np.ndarray]:
    """Per latent s, from codes ``zs[m]`` (N, S) of the same N inputs encoded from each model m:

        fires_m[s]   = #{n : Z_m[n, s] > 0}
        any[s]       = #{n : Z_m[n, s] > 0 for some m},   all[s] = #{n : ... for every m}
        cofire[s]    = all[s] / any[s]          (Jaccard over models: 1 = always fire together)
        entropy[s]   = -sum_m p_m log p_m / log M,   p_m = fires_m[s] / sum_m fires_m[s]

    Firing entropy 1 means the latent fires equally often from every model, 0 that it fires from
    one model only (the paper's firing entropy); co-firing also asks for the *same* inputs.
    ``alive`` marks latents with ``any >= min_fires``; their other entries are NaN when undefined.
    """
    if len(zs) < 2:
        raise ValueError("co-firing needs the codes of at least 2 models")
    if any(z.shape != zs[0].shape for z in zs):
        raise ValueError(f"codes must have the same shape, got {[tuple(z.shape) for z in zs]}")
    fires = torch.stack([z > 0 for z in zs])  # (M, N, S)
    counts = fires.sum(1).double()  # (M, S)
    any_ = fires.any(0).sum(0).double()
    all_ = fires.all(0).sum(0).double()
    total = counts.sum(0)
    p = counts / total.clamp_min(1)
    h = -(p * p.clamp_min(1e-12).log()).sum(0) / math.log(len(zs))
    alive = any_ >= min_fires
    nan = torch.full_like(any_, math.nan)
    return {
        "fires": counts.numpy(),
        "any": any_.numpy(),
        "all": all_.numpy(),
        "alive": alive.numpy(),
        "cofire": torch.where(alive, all_ / any_.clamp_min(1), nan).numpy(),
        "entropy": torch.where(alive & (total > 0), h, nan).numpy(),
    }


def expected_cofire(zs: Sequence[Tensor]) -> np.ndarray:
    """Chance co-firing per latent if the models fired independently at their own rates:
    E[cofire] = prod_m r_m / (1 - prod_m (1 - r_m)),  r_m = fires_m / N."""
    rates = torch.stack([(z > 0).double().mean(0) for z in zs])  # (M, S)
    both = rates.prod(0)
    either = 1 - (1 - rates).prod(0)
    return torch.where(either > 0, both / either.clamp_min(1e-12), math.nan).numpy()


# --- references: independent SAEs + a linear map, and a dense linear map ------------------------
def ridge_fit(x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """(W, b) minimising ||y - x W - b||^2 + alpha * N * ||W||^2 (centred least squares)."""
    mx, my = x.mean(0), y.mean(0)
    xc = (x - mx).double()
    gram = xc.T @ xc + alpha * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ (y - my).double()).float()
    return w, my - mx @ w


def ridge_cv(
    x: Tensor, y: Tensor, alphas: Sequence[float], folds: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor, float]:
    """``ridge_fit`` with alpha chosen by k-fold cross-validated squared error on the training rows;
    returns (W, b, alpha)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    parts = perm.chunk(folds)
    best, best_alpha = math.inf, alphas[0]
    for alpha in alphas:
        err = 0.0
        for f, held in enumerate(parts):
            kept = torch.cat([p for g, p in enumerate(parts) if g != f])
            w, b = ridge_fit(x[kept], y[kept], alpha)
            err += float((y[held] - x[held] @ w - b).pow(2).sum())
        if err < best:
            best, best_alpha = err, alpha
    w, b = ridge_fit(x, y, best_alpha)
    return w, b, best_alpha
