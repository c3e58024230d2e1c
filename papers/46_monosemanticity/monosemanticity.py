"""MonoSemanticity score (paper 46: Pach et al., NeurIPS 2025, "Sparse autoencoders learn
monosemantic features in vision-language models").

For a unit k (a neuron of a layer or an SAE latent) with activation a_n^k on image n of N images,
and an image embedder E that is independent of the model under study (the paper: DINOv2):

    s_nm   = cos(E(x_n), E(x_m))                                 pairwise image similarity
    a~_n^k = (a_n^k - min_n a_n^k) / (max_n a_n^k - min_n a_n^k)  min-max over the images
    r_nm^k = a~_n^k a~_m^k
    MS^k   = sum_{n != m} r_nm^k s_nm / sum_{n != m} r_nm^k      the MonoSemanticity score

``MS`` is the score as the authors' code computes it (``metric.py`` of ExplainableML/sae-for-vlm
sums the weighted similarities and the weights over the pairs n < m and divides one by the other;
a unit whose weights are all 0 gets NaN): the activation-weighted mean similarity of the images a
unit fires on, in the range of s. The paper's formula as printed leaves out the division,

    MS_printed^k = 1 / (N (N - 1)) sum_{n != m} r_nm^k s_nm  =  rbar^k * MS^k,
    rbar^k = ((sum_n a~_n)^2 - sum_n a~_n^2) / (N (N - 1)),

so it also counts how many pairs co-activate at all: a latent firing on 1% of the images has
rbar ~ 1e-4 and a tiny MS_printed however alike its images are (kept as a diagnostic).

In matrix form, with a~ the (N, K) matrix of normalised activations and S the (N, N) similarity,

    MS_printed = (diag(a~^T S a~) - (a~ * a~)^T diag(S)) / (N (N - 1)),

and when S = U U^T for row-normalised embeddings U (N, D), a~^T S a~ = ||U^T a~||^2 costs
O(N D K) instead of O(N^2 K). A unit whose activation is constant over the images has no
min-max normalisation; its score is NaN (the paper only scores units that fire).

If the activations of a unit are shuffled over the images, E[r_nm] = rbar^k for every pair
n != m, so E[MS_printed^k] = rbar^k * sbar with sbar the mean off-diagonal similarity: a shuffled
unit has MS ~= sbar whatever its activation profile (the control).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from common.hooks import Site, run_until


def _check_acts(acts: Tensor) -> None:
    if acts.ndim != 2:
        raise ValueError(f"activations must be (N images, K units), got shape {tuple(acts.shape)}")
    if acts.shape[0] < 2:
        raise ValueError(f"MS needs at least 2 images, got {acts.shape[0]}")


def minmax_normalise(acts: Tensor) -> tuple[Tensor, Tensor]:
    """a~_n^k = (a_n^k - min_n a^k) / (max_n a^k - min_n a^k) per column of ``acts`` (N, K).

    Returns ``(a_tilde, alive)``: ``alive[k]`` is False for a constant column (dead unit), whose
    normalised activations are set to 0.
    """
    _check_acts(acts)
    acts = acts.float()
    lo, hi = acts.min(0).values, acts.max(0).values
    span = hi - lo
    alive = span > 0
    a = (acts - lo) / torch.where(alive, span, torch.ones_like(span))
    return a * alive, alive


def cosine_similarity_matrix(emb: Tensor) -> Tensor:
    """S (N, N) with s_nm = cos(e_n, e_m) for embeddings ``emb`` (N, D)."""
    u = F.normalize(emb.float(), dim=1)
    return u @ u.T


def ms_scores(acts: Tensor, sim: Tensor, batch_size: int = 1024) -> Tensor:
    """MS^k = (a~^T S a~ - sum_n a~_n^2 s_nn) / (N (N - 1)) for every column of ``acts`` (N, K).

    ``sim`` is any (N, N) similarity matrix (symmetric in the paper, not required here); units are
    processed ``batch_size`` at a time. NaN for constant (dead) units.
    """
    _check_acts(acts)
    n = acts.shape[0]
    if sim.shape != (n, n):
        raise ValueError(f"similarity must be ({n}, {n}) for {n} images, got {tuple(sim.shape)}")
    a, alive = minmax_normalise(acts)
    sim = sim.float()
    diag = sim.diagonal()
    out = []
    for chunk in a.split(batch_size, dim=1):
        quad = ((sim @ chunk) * chunk).sum(0)
        out.append(quad - (chunk * chunk * diag[:, None]).sum(0))
    ms = torch.cat(out) / (n * (n - 1))
    return torch.where(alive, ms, torch.full_like(ms, math.nan))


def ms_scores_embedded(acts: Tensor, emb: Tensor, batch_size: int = 4096) -> Tensor:
    """The same MS with S = U U^T, U = rows of ``emb`` normalised: ||U^T a~||^2 - sum a~^2 ||u||^2.

    O(N D K) instead of O(N^2 K); identical to ``ms_scores(acts, cosine_similarity_matrix(emb))``.
    """
    _check_acts(acts)
    n = acts.shape[0]
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embeddings must be ({n}, D) for {n} images, got {tuple(emb.shape)}")
    a, alive = minmax_normalise(acts)
    u = F.normalize(emb.float(), dim=1)
    diag = (u * u).sum(1)  # 1, or 0 for a zero embedding
    out = []
    for chunk in a.split(batch_size, dim=1):
        proj = u.T @ chunk  # (D, k)
        out.append((proj * proj).sum(0) - (chunk * chunk * diag[:, None]).sum(0))
    ms = torch.cat(out) / (n * (n - 1))
    return torch.where(alive, ms, torch.full_like(ms, math.nan))


def mean_pair_weight(acts: Tensor) -> Tensor:
    """rbar^k = ((sum_n a~_n)^2 - sum_n a~_n^2) / (N (N - 1)), the mean off-diagonal r_nm^k."""
    a, alive = minmax_normalise(acts)
    n = a.shape[0]
    r = (a.sum(0) ** 2 - (a * a).sum(0)) / (n * (n - 1))
    return torch.where(alive, r, torch.full_like(r, math.nan))


def weighted_ms(ms: Tensor, acts: Tensor) -> Tensor:
    """MS^k = MS_printed^k / rbar^k = sum r s / sum r, the authors' MS (NaN where rbar = 0)."""
    r = mean_pair_weight(acts)
    return torch.where(r > 0, ms / r.clamp_min(1e-30), torch.full_like(ms, math.nan))


def unit_scores(acts: Tensor, emb: Tensor) -> dict[str, Tensor]:
    """Per unit (column of ``acts``): ``ms``, the MonoSemanticity score as the authors' code
    computes it (sum r s / sum r), and ``ms_printed``, the formula as printed (1/(N(N-1)) sum r s),
    under the image embedder whose embeddings are ``emb`` (N, D)."""
    printed = ms_scores_embedded(acts, emb)
    return {"ms": weighted_ms(printed, acts), "ms_printed": printed}


def mean_offdiagonal(sim: Tensor) -> float:
    """sbar = 1 / (N (N - 1)) sum_{n != m} s_nm."""
    n = sim.shape[0]
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def shuffle_columns(acts: Tensor, seed: int) -> Tensor:
    """Each column of ``acts`` (N, K) permuted over the images independently (the control)."""
    g = torch.Generator().manual_seed(seed)
    n, k = acts.shape
    idx = torch.argsort(torch.rand(n, k, generator=g), dim=0)
    return torch.gather(acts, 0, idx)


def label_embedding(labels: Tensor, n_labels: int) -> Tensor:
    """One-hot labels (N, C): their cosine is 1 for two images of the same label, else 0."""
    return F.one_hot(labels.long(), n_labels).float()


def pixel_embedding(images: list[Tensor], size: int = 28) -> Tensor:
    """Grey images resized to ``size`` x ``size``, flattened and centred on the mean image.

    Centring makes the cosine compare deviations from the average image (raw non-negative pixels
    have cosine near 1 for any two images of a dark-background dataset).
    """
    parts = []
    for x in images:
        x = x.float()[:, None] / 255.0 if x.dtype == torch.uint8 else x.float()[:, None]
        parts.append(F.interpolate(x, size=(size, size), mode="bilinear", antialias=True))
    flat = torch.cat(parts).flatten(1)
    return flat - flat.mean(0)


@torch.no_grad()
def block_embedding(
    model: torch.nn.Module,
    site: str | Site,
    forward: Callable[[Tensor], object],
    pixels: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = 128,
) -> Tensor:
    """Spatially pooled output (N, C) of the CNN block at ``site`` (``block.L`` of EfficientNet,
    or a ``common.hooks.Site``), the forward pass stopped there (``common.hooks.run_until``).

    ``pixels`` turns a batch of images into the network's input, ``forward`` runs the network.
    """
    model.eval()
    out: list[Tensor] = []
    for i in range(0, len(images), batch_size):
        x = pixels(images[i : i + batch_size])
        acts = run_until(model, [site], lambda x=x: forward(x))
        out.append(next(iter(acts.values())).float().mean(dim=(2, 3)))
    if not out:
        raise ValueError("no images to embed")
    return torch.cat(out)


def top_images(acts: Tensor, unit: int, n: int) -> Tensor:
    """Indices of the ``n`` images with the largest activation of column ``unit``."""
    return acts[:, unit].topk(min(n, acts.shape[0])).indices


def summarise(scores: Tensor) -> dict[str, float]:
    """Mean, median, quartiles and count of the finite scores (None-free floats for JSON)."""
    s = scores[torch.isfinite(scores)].double()
    if len(s) == 0:
        return {"mean": math.nan, "median": math.nan, "q25": math.nan, "q75": math.nan, "n": 0.0}
    q = torch.quantile(s, torch.tensor([0.25, 0.5, 0.75], dtype=s.dtype))
    return {
        "mean": float(s.mean()),
        "median": float(q[1]),
        "q25": float(q[0]),
        "q75": float(q[2]),
        "n": float(len(s)),
    }


# --- the notebook's steps ------------------------------------------------------------------------
@torch.no_grad()
def load_layer(
    clip: torch.nn.Module,
    datasets: list[str],
    n_images: int,
    n_eval: int,
    cache_dir: str,
    clip_dir: str,
) -> dict[str, object]:
    """The layer under study on a seeded subset of each dataset's training split (the cached
    pooled tower features, ``n_images`` per dataset): the CLIP-style embeddings ``emb``, the pooled
    channels ``pooled``, global labels ``y`` and their names, the images per dataset, and
    ``is_eval``, True on the last ``n_eval`` images of each dataset (held out from SAE training)."""
    from common.models.clip_style import shared_image_features

    pooled, embeds, labels, images, is_eval, label_names = [], [], [], [], [], []
    for name in datasets:
        feats, subset = shared_image_features(
            name,
            "train",
            n_images,
            seed=0,
            cache_dir=cache_dir,
            image_size=clip.cfg.image_size,
            clip_dir=clip_dir,
            tower=clip.image_tower,
            progress=False,
        )
        if len(feats) <= n_eval:
            raise ValueError(f"{name}: {len(feats)} images, need more than n_eval={n_eval}")
        embeds.append(clip.project_image_features(feats))
        pooled.append(feats)
        labels.append(subset.labels + len(label_names))
        label_names += [f"{name}/{c}" for c in subset.class_names]
        images.append(subset.images)
        flag = torch.zeros(len(feats), dtype=torch.bool)
        flag[-n_eval:] = True
        is_eval.append(flag)
    return {
        "emb": torch.cat(embeds),
        "pooled": torch.cat(pooled),
        "y": torch.cat(labels),
        "label_names": label_names,
        "images": images,
        "is_eval": torch.cat(is_eval),
    }


@torch.no_grad()
def encode_eval(sae: torch.nn.Module, x: Tensor) -> tuple[Tensor, dict[str, float]]:
    """An SAE's codes of the held-out rows ``x`` (N, d) and its reconstruction there: FVU (in the
    SAE's normalised units) and L0."""
    sae.eval()
    xs = sae.scale_in(x)
    z = sae.encode(xs)
    x_hat = sae.decode(z)
    fvu = float(((xs - x_hat) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum())
    return z, {"fvu": fvu, "l0": float((z > 0).sum(1).float().mean())}


def prefix_bounds(cfg: object) -> list[int]:
    """The latent boundaries [0, m_1, ..., d_sae] of a Matryoshka SAE's nested groups (one group,
    [0, d_sae], for any other SAE)."""
    sizes = cfg.prefix_sizes() if hasattr(cfg, "prefix_sizes") else [cfg.d_sae]
    return [0, *sizes]


def group_rows(seed: int, bounds: list[int], z: Tensor, ms: Tensor) -> list[dict[str, object]]:
    """Per nested group [m_{i-1}, m_i) of the main SAE: its firing rate and median MS."""
    return [
        {
            "seed": seed,
            "group": g,
            "latents": f"{lo}-{hi}",
            "firing_rate": float((z[:, lo:hi] > 0).float().mean()),
            "ms_median": summarise(ms[lo:hi])["median"],
        }
        for g, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))
    ]


def _clean(v: object) -> object:
    """Strict JSON: non-finite floats -> None, recursively."""
    if isinstance(v, dict):
        return {kk: _clean(vv) for kk, vv in v.items()}
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


SAE_COLUMNS = (
    "fvu",
    "l0",
    "alive_fraction",
    "ms_mean",
    "ms_median",
    "ms_printed_mean",
    "ms_printed_median",
)
SCORES = ("ms", "ms_printed")  # the authors' MS, and the formula as printed (diagnostic)


def seed_metrics(
    seed: int,
    sae_table,
    groups_table,
    main_scores: dict,
    neuron_scores: dict,
    control: dict,
    sbar: dict[str, float],
    p,
) -> dict:
    """One seed's metrics (non-finite -> None): the main SAE, its nested groups, every SAE of the
    sweeps, and under ``derived`` the medians over units the claims compare: MS (the authors') and
    MS_printed (``ms_printed_*``) of the main SAE and the neurons under each embedder, the ends of
    the width and sparsity sweeps, and the shuffle control. ``main_scores[e]`` and
    ``neuron_scores[(units, e)]`` are ``unit_scores`` dicts; ``control`` holds the shuffled
    latents' scores (``shuffled``) and the expected MS_printed (``ms_printed_expected``)."""

    def med(x: Tensor) -> float:
        return summarise(x)["median"]

    t = sae_table[sae_table.seed == seed]
    sweep = t[t.sweep == "sweep"]

    def sweep_value(exp: int, k_: int, col: str) -> float:
        return float(sweep[(sweep.expansion == exp) & (sweep.k == k_)][col].iloc[0])

    main = t[t.sweep == "main"].iloc[0]
    derived: dict[str, float] = {}
    for score in SCORES:
        derived[f"{score}_median_sae"] = med(main_scores["effnet_block"][score])
        for units in ("neurons", "pooled_neurons"):
            derived[f"{score}_median_{units}"] = med(neuron_scores[(units, "effnet_block")][score])
        derived[f"{score}_shuffled_mean"] = summarise(control["shuffled"][score])["mean"]
    derived["mean_similarity"] = sbar["effnet_block"]
    derived["ms_printed_shuffled_expected"] = summarise(control["ms_printed_expected"])["mean"]
    for e in ("pixels", "labels"):
        derived[f"ms_median_sae_{e}"] = med(main_scores[e]["ms"])
        derived[f"ms_median_neurons_{e}"] = med(neuron_scores[("neurons", e)]["ms"])
        derived[f"ms_median_pooled_neurons_{e}"] = med(neuron_scores[("pooled_neurons", e)]["ms"])
        derived[f"mean_similarity_{e}"] = sbar[e]
    lo_e, hi_e, lo_k, hi_k = min(p.expansions), max(p.expansions), min(p.ks), max(p.ks)
    for score in SCORES:
        col = f"{score}_median"
        derived[f"{score}_median_width_min"] = sweep_value(lo_e, p.k, col)
        derived[f"{score}_median_width_max"] = sweep_value(hi_e, p.k, col)
        derived[f"{score}_median_k_min"] = sweep_value(p.expansion, lo_k, col)
        derived[f"{score}_median_k_max"] = sweep_value(p.expansion, hi_k, col)
    sweeps = {
        f"{r.sweep}_{r.architecture}_x{r.expansion}_k{r.k}": {
            c: float(getattr(r, c)) for c in SAE_COLUMNS
        }
        for r in t.itertuples()
    }
    g = groups_table[groups_table.seed == seed]
    derived["ms_median_sae_first_group"] = float(g.ms_median.iloc[0])
    derived["ms_median_sae_last_group"] = float(g.ms_median.iloc[-1])
    return _clean(
        {
            "main_sae": {c: float(main[c]) for c in ("fvu", "l0", "alive_fraction")},
            "main_sae_groups": {
                r.latents: {"firing_rate": r.firing_rate, "ms_median": r.ms_median}
                for r in g.itertuples()
            },
            "saes": sweeps,
            "derived": derived,
        }
    )
