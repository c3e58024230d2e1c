"""Helpers for paper 28: Matryoshka SAE (MSAE) on CLIP embeddings (Zaigrajew et al., ICML 2025).

The SAE itself is the registry's ``msae`` (``common/sae/matryoshka.py``); this module holds the
paper's preprocessing, the nested-k evaluation, concept naming and concept-level retrieval:

* preprocessing (paper 28, Sec. 3, after SpLiCE, paper 3): x = s (e - mu), with mu the mean
  embedding of the modality and s = sqrt(d) / E||e - mu|| so that E||x|| = sqrt(d);
* nested codes: z_k = ReLU(TopK_k(pre)), and at inference TopK dropped: z = ReLU(pre);
* concept naming: latent j gets the vocabulary word w maximising cos(W_dec[j], t_w), t_w the
  centred, scaled text embedding of w, if that cosine exceeds a threshold;
* concept-level similarity search: neighbours by cos(z_q, z_g); steering z_q[j] += a * m_j.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.evals.frontier import interpolate_log_l0, matched_l0
from common.sae import SAE

WORD = re.compile(r"[a-z]+")


# --- preprocessing ----------------------------------------------------------------------------
@dataclass(frozen=True)
class EmbeddingStats:
    """Centring and scaling of one modality: x = scale * (e - mean), E||x|| = sqrt(d)."""

    mean: Tensor
    scale: float

    def apply(self, e: Tensor) -> Tensor:
        """x = s (e - mu)."""
        return (e - self.mean) * self.scale

    def invert(self, x: Tensor) -> Tensor:
        """e = x / s + mu (un-centre a reconstruction before classifying it)."""
        return x / self.scale + self.mean


def embedding_stats(e: Tensor) -> EmbeddingStats:
    """mu = mean_n e_n and s = sqrt(d) / mean_n ||e_n - mu|| (paper 28: E||x|| = sqrt(d)).

    Raises ``ValueError`` for fewer than 2 rows or identical rows (no spread to scale by).
    """
    if e.ndim != 2 or e.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, d) matrix of embeddings, got {tuple(e.shape)}")
    mean = e.mean(0)
    spread = float((e - mean).norm(dim=1).mean())
    if not spread > 0:
        raise ValueError("all embeddings are identical: cannot scale to E||x|| = sqrt(d)")
    return EmbeddingStats(mean, math.sqrt(e.shape[1]) / spread)


# --- codes ------------------------------------------------------------------------------------
@torch.no_grad()
def encode_at(sae: SAE, x: Tensor, k: int | None = None) -> Tensor:
    """The code of ``x`` at sparsity ``k``.

    MSAE (``pre_activations`` available): k given -> z = ReLU(TopK_k(pre)) (the nested code of the
    paper, TopK_k picks the k largest pre-activations); k None -> z = ReLU(pre) (TopK dropped at
    inference, paper 28). Other architectures: their own ``encode`` (k must be None).
    """
    was_training = sae.training
    sae.eval()
    try:
        if k is None:
            if sae.name == "msae":
                return torch.relu(sae.pre_activations(x))
            return sae.encode(x)
        if not hasattr(sae, "pre_activations"):
            raise ValueError(f"{sae.name} has no pre-activations: cannot pick TopK_{k}")
        if not 0 < k <= sae.cfg.d_sae:
            raise ValueError(f"k must be in [1, d_sae={sae.cfg.d_sae}], got {k}")
        pre = torch.relu(sae.pre_activations(x))
        values, indices = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)
    finally:
        sae.train(was_training)


@torch.no_grad()
def fidelity(x: Tensor, x_hat: Tensor, z: Tensor) -> dict[str, float]:
    """FVU = sum||x - x_hat||^2 / sum||x - mean x||^2, mean cos(x, x_hat), L0 = mean #(z > 0)."""
    err = (x - x_hat).pow(2).sum()
    fvu = float(err / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12))
    cos = float(F.cosine_similarity(x, x_hat, dim=-1).mean())
    l0 = float((z > 0).float().sum(-1).mean())
    return {"fvu": fvu, "cosine": cos, "l0": l0}


def at_matched_l0(points: dict[str, tuple[Sequence[float], Sequence[float]]]) -> dict[str, float]:
    """Every family's metric at one common L0 (``common.evals.frontier``): interpolate each
    family's (L0, y) points linearly in log L0 at L0* = geometric midpoint of the shared range.

    Returns ``{"l0": L0*, family: y(L0*) ...}``.
    """
    star = matched_l0({name: list(l0) for name, (l0, _) in points.items()})
    out = {"l0": star}
    for name, (l0, y) in points.items():
        out[name] = interpolate_log_l0(list(l0), list(y), star)
    return out


# --- zero-shot through the reconstruction -----------------------------------------------------
@torch.no_grad()
def zero_shot_accuracy(embeddings: Tensor, class_weights: Tensor, labels: Tensor) -> float:
    """CLIP zero-shot: mean 1[argmax_c <normalize(e), w_c> = y] (normalising does not change the
    argmax, but keeps the scores comparable)."""
    pred = (F.normalize(embeddings, dim=-1) @ class_weights.T).argmax(1)
    return float((pred == labels).float().mean())


# --- latent statistics ------------------------------------------------------------------------
def label_entropy(labels: Tensor | np.ndarray) -> float:
    """H = -sum_c p_c log p_c (nats) of the empirical label distribution."""
    labels = np.asarray(labels).ravel()
    if labels.size == 0:
        return math.nan
    p = np.unique(labels, return_counts=True)[1] / labels.size
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def top_images(z: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """Per latent, the m images of largest activation: (indices (d_sae, m), valid mask) where
    valid marks positive activations (a latent firing on fewer than m images has fewer)."""
    m = min(m, z.shape[0])
    values, idx = z.topk(m, dim=0)
    return idx.T, (values > 0).T


def top_image_stats(z: Tensor, labels: Tensor, m: int) -> dict[str, np.ndarray]:
    """Per latent: number of images it fires on, label entropy of its top-m images, majority label
    and purity (share of the majority label among the top-m). Entropy / purity are NaN and the
    majority -1 for latents firing on fewer than m images."""
    idx, valid = top_images(z, m)
    n_fire = (z > 0).sum(0).numpy()
    d = z.shape[1]
    entropy, purity = np.full(d, np.nan), np.full(d, np.nan)
    majority = np.full(d, -1, dtype=np.int64)
    lab = labels.numpy()
    for j in range(d):
        if int(valid[j].sum()) < m:
            continue
        ys = lab[idx[j].numpy()]
        entropy[j] = label_entropy(ys)
        values, counts = np.unique(ys, return_counts=True)
        majority[j], purity[j] = values[counts.argmax()], counts.max() / m
    return {"n_fire": n_fire, "entropy": entropy, "majority": majority, "purity": purity}


@torch.no_grad()
def rank_usage(z: Tensor, k_small: int, k_large: int) -> tuple[np.ndarray, np.ndarray]:
    """How often each latent is among an input's ``k_small`` largest activations (coarse uses)
    and how often it ranks in (k_small, k_large] (uses added by the larger k). Only positive
    activations count."""
    values, idx = z.topk(k_large, dim=-1)
    d = z.shape[1]
    on = values > 0
    coarse = torch.bincount(idx[:, :k_small][on[:, :k_small]], minlength=d)
    fine = torch.bincount(idx[:, k_small:][on[:, k_small:]], minlength=d)
    return coarse.numpy(), fine.numpy()


# --- vocabulary and naming --------------------------------------------------------------------
def corpus_nouns(
    texts: Sequence[str], labels: Sequence[str], n: int, min_len: int = 3
) -> list[str]:
    """The ``n`` WordNet noun lemmas (single lowercase words) most frequent in the glosses of the
    corpus itself: a frequency-ranked vocabulary built from ``common.data.text.wordnet``.

    ``texts`` are ``"lemma: gloss"`` documents, ``labels`` their lexicographer files. Ties are
    broken alphabetically, so the list is deterministic.
    """
    lemmas = set()
    for text, label in zip(texts, labels, strict=True):
        lemma = text.split(":", 1)[0]
        if label.startswith("noun.") and WORD.fullmatch(lemma) and len(lemma) >= min_len:
            lemmas.add(lemma)
    counts: Counter[str] = Counter()
    for text in texts:
        gloss = text.split(":", 1)[1] if ":" in text else text
        counts.update(w for w in WORD.findall(gloss.lower()) if w in lemmas)
    ranked = sorted(lemmas, key=lambda w: (-counts[w], w))
    return ranked[:n]


def build_vocabulary(class_words: Sequence[str], extra: Sequence[str]) -> list[str]:
    """Class names first, then the extra words not already present (order kept, no duplicates)."""
    out, seen = [], set()
    for w in list(class_words) + list(extra):
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@torch.no_grad()
def name_latents(decoder: Tensor, vocab: Tensor, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Name latent j by w_j = argmax_w cos(W_dec[j], t_w) when that cosine exceeds ``threshold``
    (paper 28's concept matching); -1 otherwise. Returns (word index per latent, best cosine)."""
    sim = F.normalize(decoder, dim=-1) @ F.normalize(vocab, dim=-1).T
    best, word = sim.max(1)
    word = torch.where(best > threshold, word, torch.full_like(word, -1))
    return word.numpy(), best.numpy()


def naming_accuracy(names: np.ndarray, truth: np.ndarray) -> float:
    """Share of latents whose name index equals the true word index (unnamed = -1 counts wrong)."""
    if len(names) == 0:
        return math.nan
    return float(np.mean(np.asarray(names) == np.asarray(truth)))


def shuffled_naming_accuracy(
    names: np.ndarray, truth: np.ndarray, n_perm: int = 200, seed: int = 0
) -> float:
    """Control: the naming accuracy with the names permuted among the same latents (mean over
    ``n_perm`` permutations): what matching names to latents by chance gives."""
    if len(names) == 0:
        return math.nan
    rng = np.random.default_rng(seed)
    names, truth = np.asarray(names), np.asarray(truth)
    return float(np.mean([np.mean(rng.permutation(names) == truth) for _ in range(n_perm)]))


# --- concept-level similarity search ----------------------------------------------------------
@torch.no_grad()
def code_neighbours(queries: Tensor, gallery: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The n gallery items of largest cos(z_q, z_g) per query: (indices (Q, n), similarities)."""
    sim = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    values, idx = sim.topk(min(n, gallery.shape[0]), dim=-1)
    return idx, values


@torch.no_grad()
def shared_concepts(z_a: Tensor, z_b: Tensor, top: int) -> list[tuple[int, float]]:
    """Why two inputs match: the latents with the largest min(z_a[j], z_b[j]) > 0, i.e. concepts
    both codes use, each with its contribution."""
    shared = torch.minimum(z_a, z_b)
    values, idx = shared.topk(min(top, shared.numel()))
    return [(int(i), float(v)) for i, v in zip(idx, values, strict=True) if v > 0]


@torch.no_grad()
def steer(z: Tensor, latent: int, strength: float, unit: float) -> Tensor:
    """z' = z with z'[latent] = z[latent] + strength * unit (paper 28 raises a concept's weight in
    the query code to steer retrieval; ``unit`` sets the scale, e.g. the latent's typical
    activation)."""
    out = z.clone()
    out[..., latent] = out[..., latent] + strength * unit
    return out


@torch.no_grad()
def class_selective_latent(
    z: Tensor, labels: Tensor, target: int, exclude: Sequence[int] = ()
) -> int:
    """The latent most specific to class ``target``: argmax_j mean_{y = target} z_j -
    mean_{y != target} z_j (latents in ``exclude`` skipped)."""
    inside = labels == target
    if not bool(inside.any()) or bool(inside.all()):
        raise ValueError(f"class {target} must be present and not the only class")
    score = z[inside].mean(0) - z[~inside].mean(0)
    if len(exclude):
        score[list(exclude)] = -math.inf
    return int(score.argmax())


# --- the notebook's steps ---------------------------------------------------------------------
def load_embeddings(
    clip: torch.nn.Module,
    datasets: Sequence[str],
    sizes: dict[str, int],
    cache_dir: str,
    clip_dir: str,
) -> tuple[dict, dict, dict, list[str], dict]:
    """CLIP image embeddings of the seeded subsets (``sizes[split]`` images per dataset, pooled
    features from the pipeline's cache, projected by the image head): per split the embeddings,
    the global labels (10 * dataset + class) and the images per dataset; the class words (the
    20 labels' names) and each dataset's zero-shot class weights."""
    from common.models.clip_style import TEMPLATES, shared_image_features

    emb, labels, images, class_words, zs_weights = {}, {}, {}, [], {}
    for split, n in sizes.items():
        e_parts, y_parts, img_parts = [], [], []
        for d, name in enumerate(datasets):
            feats, subset = shared_image_features(
                name,
                split,
                n,
                seed=0,
                cache_dir=cache_dir,
                image_size=clip.cfg.image_size,
                clip_dir=clip_dir,
                tower=clip.image_tower,  # a hub CLIP's own tower in the GPU/hub profile
                progress=False,
            )
            with torch.no_grad():
                e_parts.append(clip.project_image_features(feats))
            y_parts.append(subset.labels + 10 * d)
            img_parts.append(subset.images)
            if split == "train":
                class_words += list(subset.class_names)
                with torch.no_grad():
                    zs_weights[name] = clip.zero_shot_weights(
                        list(subset.class_names), list(TEMPLATES[name])
                    )
        emb[split], labels[split] = torch.cat(e_parts), torch.cat(y_parts)
        images[split] = img_parts
    return emb, labels, images, class_words, zs_weights


def coarse_fine(sae: SAE, x: Tensor, labels: Tensor, k_small: int, k_large: int, top_m: int):
    """Label entropy and firing rate of the coarse latents (used within ``k_small`` by some input),
    the fine ones (only ever added between ``k_small`` and ``k_large``) and the mostly coarse ones
    (used within ``k_small`` at least as often as beyond), and their numbers."""
    z = encode_at(sae, x, k_large)
    coarse_uses, fine_uses = rank_usage(z, k_small, k_large)
    stats = top_image_stats(z, labels, top_m)
    ok = ~np.isnan(stats["entropy"])
    groups = {
        "coarse": ok & (coarse_uses > 0),  # used within the smallest k by some input
        "fine": ok & (coarse_uses == 0) & (fine_uses > 0),  # only ever added at larger k
        "mostly_coarse": ok & (coarse_uses > 0) & (coarse_uses >= fine_uses),
    }
    out = {}
    for group, mask in groups.items():
        any_ = bool(mask.any())
        out[f"entropy_{group}"] = float(stats["entropy"][mask].mean()) if any_ else float("nan")
        out[f"firing_{group}"] = (
            float(stats["n_fire"][mask].mean() / len(z)) if any_ else float("nan")
        )
        out[f"n_{group}"] = int(mask.sum())
    return out


def naming_scores(
    sae: SAE, x: Tensor, labels: Tensor, vocab_x: Tensor, n_labels: int, p, seed: int
) -> tuple[dict, tuple[np.ndarray, np.ndarray], dict]:
    """Naming accuracy on the latents whose ``p.top_m`` top images are mostly one class (share
    >= ``p.min_purity``), its shuffled control, and the share of named latents; also the names
    (and best cosines) and the top-image statistics."""
    z = encode_at(sae, x)
    stats = top_image_stats(z, labels, p.top_m)
    names, best = name_latents(sae.W_dec.detach(), vocab_x, p.name_threshold)
    pure = np.flatnonzero(stats["purity"] >= p.min_purity)
    truth = stats["majority"][pure]  # the class index is the word index (class names first)
    named = names >= 0
    row = {
        "accuracy": naming_accuracy(names[pure], truth),
        "shuffled": shuffled_naming_accuracy(names[pure], truth, seed=seed),
        "n_pure": len(pure),
        "named_fraction": float(named.mean()),
        "class_word_fraction": float((names[named] < n_labels).mean())
        if named.any()
        else float("nan"),
    }
    return row, (names, best), stats


def steering_targets(y_q: Tensor, seed: int) -> np.ndarray:
    """For each query a random other class of its own dataset (labels 10 * dataset + class)."""
    rng = np.random.default_rng(seed)
    return np.array(
        [10 * (int(y) // 10) + rng.choice([c for c in range(10) if c != int(y) % 10]) for y in y_q]
    )


def concept_unit(z_gal: Tensor, c: int) -> float:
    """The mean positive activation of latent ``c`` on the gallery (1 if it never fires)."""
    return float(z_gal[:, c][z_gal[:, c] > 0].mean()) if (z_gal[:, c] > 0).any() else 1.0


def steering_shares(
    z_gal: Tensor,
    y_gal: Tensor,
    z_q: Tensor,
    y_q: Tensor,
    targets: np.ndarray,
    concept: dict[int, int],
    strengths: Sequence[float],
    n_neighbours: int,
) -> dict[str, dict[float, float]]:
    """Per strength a, the mean share of each query's neighbours (codes steered toward its target
    concept) that are of the target class, and that are of the query's own class."""
    shares = {a: [] for a in strengths}
    own = {a: [] for a in strengths}
    for i in range(len(z_q)):
        c = concept[int(targets[i])]
        unit = concept_unit(z_gal, c)
        for a in strengths:
            idx, _ = code_neighbours(steer(z_q[i : i + 1], c, a, unit), z_gal, n_neighbours)
            ys = y_gal[idx[0]]
            shares[a].append(float((ys == int(targets[i])).float().mean()))
            own[a].append(float((ys == int(y_q[i])).float().mean()))
    return {
        "target_share": {a: float(np.mean(v)) for a, v in shares.items()},
        "query_class_share": {a: float(np.mean(v)) for a, v in own.items()},
    }


def identity_keeping_strength(
    query_class_share: dict[float, float], strengths: Sequence[float]
) -> float:
    """The steering read-out point, fixed before reading the target share: the largest strength
    a of the increasing grid such that the query's own class is still at least half of its
    unsteered share among the neighbours at a and at every smaller strength,
    own(a') >= own(0) / 2 for all a' <= a. Beyond it the push replaces the query's identity
    rather than adding a concept to it. ``strengths[0]`` is the unsteered 0 (returned when the
    first push already halves the query's class)."""
    grid = list(strengths)
    if not grid or grid[0] != 0 or any(b <= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"strengths must start at 0 and increase, got {grid}")
    floor = query_class_share[grid[0]] / 2
    read = grid[0]
    for a in grid[1:]:
        if query_class_share[a] < floor:
            break
        read = a
    return read


def _nn(v) -> float | None:
    """Strict JSON: NaN / inf -> null."""
    return None if v is None or not np.isfinite(v) else float(v)


def seed_metrics(
    f,
    matched: dict,
    hierarchy: dict,
    naming: dict,
    steering: dict,
    *,
    zero_shot_original: float,
    msae_ks: Sequence[int],
    steer_strengths: Sequence[float],
    train_seconds: float,
) -> dict:
    """One seed's metrics: every frontier point (``f``: this seed's rows), the matched-L0
    comparison, the hierarchy, naming and steering statistics, and under ``derived`` the numbers
    the claims compare (NaN / inf -> null); the steered shares are read at
    ``identity_keeping_strength``."""
    points = {
        fam: {
            r.setting: {"l0": r.l0, "fvu": r.fvu, "cosine": r.cosine, "zero_shot": r.zero_shot}
            for r in g.itertuples()
        }
        for fam, g in f.groupby("family")
    }
    m, h, nm, st = matched, hierarchy, naming, steering
    read = identity_keeping_strength(st["query_class_share"], steer_strengths)
    msae_k = f[f.family == "msae"].set_index("setting")
    single = f[f.family == "topk_single"].set_index("setting")
    shared_k = [s for s in msae_k.index if s in single.index]
    relu_row = f[f.family == "msae_relu"].iloc[0]
    derived = {
        "matched_l0": _nn(m["fvu"]["l0"]),
        **{f"fvu_at_l0_{fam}": _nn(m["fvu"][fam]) for fam in ("msae", "topk", "relu")},
        **{f"cosine_at_l0_{fam}": _nn(m["cosine"][fam]) for fam in ("msae", "topk", "relu")},
        "msae_mean_fvu_over_k": _nn(msae_k.loc[shared_k, "fvu"].mean()) if shared_k else None,
        "topk_single_mean_fvu_over_k": _nn(single.loc[shared_k, "fvu"].mean())
        if shared_k
        else None,
        "zero_shot_original": zero_shot_original,
        "zero_shot_msae_relu": _nn(relu_row.zero_shot),
        "zero_shot_msae_kmax": _nn(msae_k.loc[f"k={msae_ks[-1]}", "zero_shot"]),
        "msae_relu_l0": _nn(relu_row.l0),
        "msae_relu_fvu": _nn(relu_row.fvu),
        "msae_relu_cosine": _nn(relu_row.cosine),
        **{f"entropy_{g}": _nn(h["msae"][f"entropy_{g}"]) for g in ("coarse", "fine")},
        "entropy_mostly_coarse": _nn(h["msae"]["entropy_mostly_coarse"]),
        **{f"topk_entropy_{g}": _nn(h["topk"][f"entropy_{g}"]) for g in ("coarse", "fine")},
        "naming_accuracy": _nn(nm["msae"]["accuracy"]),
        "naming_shuffled": _nn(nm["msae"]["shuffled"]),
        "topk_naming_accuracy": _nn(nm["topk"]["accuracy"]),
        "target_share_unsteered": st["target_share"][steer_strengths[0]],
        "target_share_steered": st["target_share"][read],
        "query_class_share_unsteered": st["query_class_share"][steer_strengths[0]],
        "query_class_share_steered": st["query_class_share"][read],
        "steer_strength_read": read,
        "target_share_at_max_strength": st["target_share"][steer_strengths[-1]],
        "query_class_share_at_max_strength": st["query_class_share"][steer_strengths[-1]],
    }
    return {
        "frontier": {
            fam: {s: {k: _nn(v) for k, v in d.items()} for s, d in pts.items()}
            for fam, pts in points.items()
        },
        "matched": {metric: {k: _nn(v) for k, v in r.items()} for metric, r in m.items()},
        "hierarchy": {fam: {k: _nn(v) for k, v in r.items()} for fam, r in h.items()},
        "naming": {fam: {k: _nn(v) for k, v in r.items()} for fam, r in nm.items()},
        "steering": {key: {f"{a:g}": v for a, v in d.items()} for key, d in st.items()},
        "train_seconds": train_seconds,
        "derived": derived,
    }
