"""Paper 21's steps around the universal SAE (Thasarathan et al., ICML 2025, "Universal Sparse
Autoencoders: Interpretable Cross-Model Concept Alignment").

The architecture is the registry's ``universal`` (``common.sae.universal.UniversalSAE``), trained
by the one trainer ``common.train`` on the models' paired activations side by side,
x = [A_1 | ... | A_M] (``concat_models``). One sparse code Z is shared by M models; model i has an
encoder Psi_i and a decoder D_i:

    Z_i     = Psi_i(A_i) = TopK_k(ReLU(W_enc_i^T (A_i - b_pre_i) + b_enc_i))
    A_hat_j = Z_i D_j + b_pre_j                         (decode the code of model i as model j)

and every training step draws one model i, encodes its activations of a batch of inputs and
reconstructs *every* model's activations of the same inputs from that code (Sec. 3 of the paper),

    L = sum_j || A_j - Psi_i(A_i) D_j ||_F^2 .

Here: the activations (``pooled_site_activations``, ``image_split``), their per-model
standardisation (``Standardizer``: centred, scaled so E||A_j - mu_j||^2 = 1 on the training set, so
each term of L is a fraction of variance and no model dominates because it is wider), the
shuffled-pairing control, and the evaluation: the cross-reconstruction matrix FVU[i, j] (encode
with i, decode to j), per-latent co-firing (a latent that fires for model i on an image also fires
for model j on the same image) and firing entropy (how evenly a latent's firings are spread over
the models), against a USAE trained with the image pairing between models shuffled and against
independent SAEs joined by a post-hoc linear map (``independent_map_fvu``); and the claims'
numbers per seed (``seed_metrics``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common import hooks
from common.data.images import load_image_set
from common.evals.reconstruction import reconstruction_metrics
from common.models.clip_style import to_pixels
from common.models.loading import LoadedModel
from common.sae.base import SAE
from common.sae.universal import UniversalSAE


# --- activations ----------------------------------------------------------------------------------
def _pool(site: hooks.Site, x: Tensor) -> Tensor:
    """a_n = (1 / HW) sum_{h,w} x_n[:, h, w]: one vector per image of a spatial site's map."""
    if site.layout != "spatial":
        raise ValueError(f"site {site.name!r} is not a spatial CNN site")
    return x.mean((2, 3))


@torch.inference_mode()
def pooled_site_activations(
    loaded: LoadedModel,
    images: Tensor,
    sites: Sequence[str],
    image_size: int,
    batch_size: int = 64,
) -> dict[str, Tensor]:
    """Per-image mean over spatial positions of each CNN site: {site: (N, C_site)}.

    A spatial site (B, C, H, W) gives one token per position (``common.hooks``); pooling them,
    a_n = (1 / HW) sum_{h,w} x_n[:, h, w], gives one vector per image and per site (``capture``
    pools each call's tensor as it records it). All sites come from one forward pass of
    ``loaded.model`` (an EfficientNet) at ``image_size`` pixels.
    """
    if not hasattr(loaded.model, "extract_features"):
        raise TypeError(f"{loaded.name} is not an EfficientNet: load 'efficientnet-lite0'")
    if len(set(sites)) != len(sites) or not sites:
        raise ValueError(f"sites must be distinct and non-empty, got {list(sites)}")
    model = loaded.model.to(memory_format=torch.channels_last)
    with hooks.capture(model, sites, transform=_pool) as cap:
        for start in range(0, len(images), batch_size):
            x = to_pixels(images[start : start + batch_size], image_size)
            x = loaded.preprocess(x).contiguous(memory_format=torch.channels_last)
            model.extract_features(x)
    return {s: torch.cat(cap[s]).float() for s in sites}


@dataclass
class ImageSplit:
    """One split of every dataset, in order: pooled activations ``acts[m]`` (N, d_m) of each site,
    the images (uint8 (H, W) each), labels offset per dataset, and the label names."""

    acts: list[Tensor]
    images: list[Tensor]
    labels: Tensor
    label_names: list[str]


def image_split(
    loaded: LoadedModel,
    datasets: Sequence[str],
    split: str,
    n: int,
    sites: Sequence[str],
    image_size: int,
    batch_size: int = 64,
) -> ImageSplit:
    """``n`` images (the seed-0 subset) of each dataset's ``split`` and their pooled activations;
    label c of the d-th dataset becomes c + (number of classes of the datasets before it)."""
    acts: dict[str, list[Tensor]] = {s: [] for s in sites}
    images: list[Tensor] = []
    labels: list[Tensor] = []
    names: list[str] = []
    for name in datasets:
        s = load_image_set(name, split).subset(n, seed=0)
        pooled = pooled_site_activations(loaded, s.images, sites, image_size, batch_size)
        for site in sites:
            acts[site].append(pooled[site])
        labels.append(s.labels + len(names))
        names += [f"{name}/{c}" for c in s.class_names]
        images += list(s.images)
    return ImageSplit([torch.cat(acts[s]) for s in sites], images, torch.cat(labels), names)


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


def shuffle_pairing(xs: Sequence[Tensor], seed: int) -> list[Tensor]:
    """The control: rows of every model but the first permuted, so row n of model 0 and row n of
    model m come from different images; each model's own distribution is unchanged."""
    g = torch.Generator().manual_seed(seed)
    return [xs[0]] + [x[torch.randperm(len(x), generator=g)] for x in xs[1:]]


# --- measures -------------------------------------------------------------------------------------
@torch.no_grad()
def codes(model: UniversalSAE, xs: Sequence[Tensor]) -> list[Tensor]:
    """Z_i = Psi_i(A_i) for every model i: a list of (N, S) codes of the same N inputs."""
    if len(xs) != model.n_models:
        raise ValueError(
            f"the universal SAE has {model.n_models} models (widths {model.d_models}), got the "
            f"activations of {len(xs)}: pass one (N, d_m) tensor per model, in its order"
        )
    return [model.encode(x, model=i) for i, x in enumerate(xs)]


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
            out[i, j] = reconstruction_metrics(x, model.decode(z, model=j))["fvu"]
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


def sae_codes(sae: SAE, x: Tensor) -> Tensor:
    """z = encode(c x): an SAE trained on normalised activations encodes them scaled alike."""
    with torch.no_grad():
        return sae.encode(sae.scale_in(x))


def sae_decode(sae: SAE, z: Tensor) -> Tensor:
    """x_hat = decode(z) / c, back in the units of the activations."""
    with torch.no_grad():
        return sae.scale_out(sae.decode(z))


def independent_map_fvu(
    saes: Sequence[SAE],
    train_x: Sequence[Tensor],
    test_x: Sequence[Tensor],
    alphas: Sequence[float],
    seed: int,
) -> np.ndarray:
    """FVU[i, j] of independent SAEs joined after training: the diagonal is SAE j on its own model;
    off it, a ridge map M (penalty by 4-fold CV on the training codes) from SAE i's code to SAE j's
    code, decoded by SAE j: A_hat_j = D_j(ReLU(z_i M + b))."""
    z_train = [sae_codes(s, x) for s, x in zip(saes, train_x, strict=True)]
    z_test = [sae_codes(s, x) for s, x in zip(saes, test_x, strict=True)]
    m = len(saes)
    out = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            if i == j:
                x_hat = sae_decode(saes[j], z_test[j])
            else:
                w, b, _ = ridge_cv(z_train[i], z_train[j], alphas, seed=seed)
                x_hat = sae_decode(saes[j], (z_test[i] @ w + b).clamp_min(0))
            out[i, j] = reconstruction_metrics(test_x[j], x_hat)["fvu"]
    return out


def dense_ridge_fvu(
    train_x: Sequence[Tensor], test_x: Sequence[Tensor], alphas: Sequence[float]
) -> np.ndarray:
    """FVU[i, j] of a dense ridge map A_i -> A_j (no sparse bottleneck), fitted on training rows."""
    m = len(train_x)
    out = np.zeros((m, m))
    for i in range(m):
        for j in range(m):
            w, b, _ = ridge_cv(train_x[i], train_x[j], alphas)
            out[i, j] = reconstruction_metrics(test_x[j], test_x[i] @ w + b)["fvu"]
    return out


# --- sharing summaries, top images, the claims' numbers -------------------------------------------
def _number(value: float | None) -> float | None:
    """``value`` as a float; None where it is undefined (None or NaN)."""
    return None if value is None or math.isnan(value) else float(value)


def sharing_summary(
    zs: Sequence[Tensor], min_fires: int, shared_threshold: float
) -> tuple[dict[str, np.ndarray], dict[str, float | None]]:
    """``cofiring(zs, min_fires)`` and its means over the alive latents: the alive fraction, mean
    co-firing, the shared share (co-firing > ``shared_threshold``), mean firing entropy, the share
    with entropy > 0.9 and the mean chance co-firing (``expected_cofire``); None where no latent is
    alive."""
    c = cofiring(zs, min_fires)
    alive = c["alive"]
    summary: dict[str, float | None] = dict.fromkeys(
        ("alive_fraction", "cofire_mean", "shared_share", "entropy_mean", "entropy_high_share")
    )
    summary["alive_fraction"] = float(alive.mean())
    if alive.any():
        summary["cofire_mean"] = float(np.nanmean(c["cofire"][alive]))
        summary["shared_share"] = float((c["cofire"][alive] > shared_threshold).mean())
        summary["entropy_mean"] = float(np.nanmean(c["entropy"][alive]))
        summary["entropy_high_share"] = float((c["entropy"][alive] > 0.9).mean())
    chance = expected_cofire(zs)[alive]
    summary["chance_cofire_mean"] = float(np.nanmean(chance)) if len(chance) else None
    return c, {key: _number(v) for key, v in summary.items()}


def top_images(z: Tensor, latent: int, n: int) -> Tensor:
    """Indices of the (at most) ``n`` inputs that excite ``latent`` most, of those it fires on."""
    values, idx = z[:, latent].topk(n)
    return idx[values > 0]


def top_overlap(zs: Sequence[Tensor], latents: Sequence[int], n: int) -> float | None:
    """Mean over ``latents`` of the Jaccard overlap of the top-``n`` images from model 1 and 2."""
    out = []
    for s in latents:
        a, b = set(top_images(zs[0], s, n).tolist()), set(top_images(zs[1], s, n).tolist())
        if a or b:
            out.append(len(a & b) / len(a | b))
    return float(np.mean(out)) if out else None


def shared_latents(c: dict[str, np.ndarray], shared_threshold: float) -> np.ndarray:
    """The alive latents whose co-firing exceeds ``shared_threshold``."""
    return np.flatnonzero(c["alive"] & (np.nan_to_num(c["cofire"]) > shared_threshold))


def pick_concepts(
    c: dict[str, np.ndarray], zs: Sequence[Tensor], labels: Tensor, n_concepts: int, n_top: int
) -> list[int]:
    """The grid's latents: most shared first (then most firing), alive and firing on at least
    ``n_top`` images from every model; one per label of its top image where possible."""
    order = np.lexsort((-c["any"], -np.nan_to_num(c["cofire"], nan=-1.0)))
    eligible = [int(s) for s in order if c["alive"][s] and min(c["fires"][:, s]) >= n_top]
    picked, seen = [], set()
    for s in eligible:
        label = int(labels[top_images(zs[0], s, 1)[0]])
        if label not in seen and len(picked) < n_concepts:
            picked.append(s)
            seen.add(label)
    return picked + [s for s in eligible if s not in picked][: n_concepts - len(picked)]


SHARING_KEYS = (
    "alive_fraction",
    "cofire_mean",
    "shared_share",
    "entropy_mean",
    "entropy_high_share",
)


def seed_metrics(
    fvu: dict[str, np.ndarray],
    sharing: dict[str, dict[str, float | None]],
    top_image_overlap: float | None,
) -> dict[str, dict]:
    """One seed's metrics: the FVU matrices ``fvu[kind]`` (``usae``, ``shuffled``,
    ``independent_map``, ``dense_ridge``), the sharing summaries ``sharing[kind]`` (``usae``,
    ``permuted_pairs``, ``shuffled``) and under ``derived`` the numbers the claims compare:
    ``cross_fvu`` is the mean off-diagonal FVU, ``cross_minus_self_fvu`` the mean over i != j of
    FVU[i, j] - FVU[j, j] (the cost of encoding from the other model)."""
    u, sh, ind, dense = (fvu[k] for k in ("usae", "shuffled", "independent_map", "dense_ridge"))
    m = len(u)
    gap = np.mean([u[i, j] - u[j, j] for i in range(m) for j in range(m) if i != j])
    usae = sharing["usae"]
    return {
        "fvu": {kind: matrix.tolist() for kind, matrix in fvu.items()},
        "sharing": {
            kind: {key: sharing[kind][key] for key in SHARING_KEYS}
            for kind in ("usae", "permuted_pairs", "shuffled")
        },
        "derived": {
            "self_fvu": float(np.diag(u).mean()),
            "cross_fvu": off_diagonal_mean(u),
            "cross_minus_self_fvu": float(gap),
            "shuffled_self_fvu": float(np.diag(sh).mean()),
            "shuffled_cross_fvu": off_diagonal_mean(sh),
            "cross_over_shuffled_cross": off_diagonal_mean(u) / off_diagonal_mean(sh),
            "independent_self_fvu": float(np.diag(ind).mean()),
            "independent_map_cross_fvu": off_diagonal_mean(ind),
            "self_minus_independent_self_fvu": float(np.diag(u).mean() - np.diag(ind).mean()),
            "dense_ridge_cross_fvu": off_diagonal_mean(dense),
            "shared_share": usae["shared_share"],
            "shuffled_shared_share": sharing["shuffled"]["shared_share"],
            "permuted_shared_share": sharing["permuted_pairs"]["shared_share"],
            "cofire_mean": usae["cofire_mean"],
            "permuted_cofire_mean": sharing["permuted_pairs"]["cofire_mean"],
            "chance_cofire_mean": usae["chance_cofire_mean"],
            "entropy_mean": usae["entropy_mean"],
            "entropy_high_share": usae["entropy_high_share"],
            "alive_fraction": usae["alive_fraction"],
            "top_image_overlap": top_image_overlap,
        },
    }
