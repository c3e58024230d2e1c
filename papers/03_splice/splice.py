"""Sparse Linear Concept Embeddings (paper 3: Bhalla et al., NeurIPS 2024, "SpLiCE").

SpLiCE decomposes a CLIP image embedding into a sparse, nonnegative combination of the text
embeddings of a fixed vocabulary of human-readable concepts, without any training:

    vocabulary   the most frequent 1-2 word phrases of a caption corpus, near-duplicates removed
                 (a phrase is dropped when its embedding has cosine > 0.9 with a more frequent one)
    dictionary   C = [c_1 .. c_K],  c_k = normalize(e_T(phrase_k) - mu_con)
                 (mu_con = mean concept embedding: text embeddings live in their own cone)
    target       z = normalize(e_I - mu_img)        (mu_img = mean image embedding: the
                                                    modality gap between image and text cones)
    code         w* = argmin_{w >= 0} ||C w - z||_2^2 + 2 lambda ||w||_1   (nonnegative lasso)
    reconstruct  z_hat = normalize(C w* + mu_img)

Without centring (the ablation the paper motivates), C holds the raw normalised text embeddings,
z = e_I and z_hat = normalize(C w*).

The lasso is solved for a batch of images at once by projected FISTA (Beck & Teboulle 2009) on
(1/2)||C w - z||^2 + lambda ||w||_1 (the same minimiser as the paper's objective), with step
1/L, L = ||C||_2^2, and the proximal step of the nonnegative L1 penalty, w <- max(0, v - lambda/L).
``nonneg_lasso_sklearn`` solves one image with scikit-learn's coordinate descent as a check.

The paper's linearity check: the embedding of two images put side by side is close to the
average of their embeddings, cos(e(a|b), normalize(e(a) + e(b))).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def words_of(text: str) -> list[str]:
    """Lower-case words of ``text`` (letters and inner apostrophes; digits and URLs' punctuation
    split words). Tweets' @handles and links are dropped before splitting."""
    text = re.sub(r"(@\w+|https?://\S+|www\.\S+)", " ", text.lower())
    return WORD.findall(text)


def phrase_counts(
    texts: Iterable[str],
    stop_words: Iterable[str],
    min_letters: int = 3,
    document_frequency: bool = True,
) -> tuple[Counter, Counter]:
    """Counts of 1-word and 2-word phrases over ``texts``.

    A unigram counts when it is not a stop word and has >= ``min_letters`` letters; a bigram of
    adjacent words counts when both words would count as unigrams ("of the" never does). With
    ``document_frequency`` a phrase counts once per document (as in a corpus of captions).
    """
    stop = set(stop_words)
    uni: Counter = Counter()
    bi: Counter = Counter()
    for text in texts:
        ws = words_of(text)
        ok = [len(w) >= min_letters and w not in stop and "'" not in w for w in ws]
        u = [w for w, good in zip(ws, ok) if good]
        b = [f"{a} {c}" for a, c, ga, gc in zip(ws, ws[1:], ok, ok[1:]) if ga and gc and a != c]
        uni.update(set(u) if document_frequency else u)
        bi.update(set(b) if document_frequency else b)
    return uni, bi


def class_name_words(class_names: Iterable[str]) -> set[str]:
    """Words of the class names and their plurals ("ankle boot" -> ankle, ankles, boot, boots)."""
    out = set()
    for name in class_names:
        for w in words_of(name.replace("-", " ")):
            out |= {w, w + "s", w + "es"}
    return out


def top_phrases(
    unigrams: Counter,
    bigrams: Counter,
    n_unigrams: int,
    n_bigrams: int,
    exclude_words: Iterable[str] = (),
    include: Sequence[str] = (),
) -> list[str]:
    """The ``n_unigrams`` most frequent unigrams then the ``n_bigrams`` most frequent bigrams,
    skipping phrases with a word in ``exclude_words``; ``include`` is prepended (deduplicated).

    Order matters: near-duplicate removal keeps the earlier phrase.
    """
    excl = set(exclude_words)

    def allowed(phrase: str) -> bool:
        return not (set(phrase.split()) & excl)

    uni = [p for p, _ in unigrams.most_common() if allowed(p)][:n_unigrams]
    bi = [p for p, _ in bigrams.most_common() if allowed(p)][:n_bigrams]
    out, seen = [], set()
    for p in list(include) + uni + bi:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def dedupe_by_cosine(emb: Tensor, threshold: float = 0.9, protect: int = 0) -> np.ndarray:
    """Indices kept by greedy near-duplicate removal, in order.

    Row i of ``emb`` (K, D) is kept when its cosine with every already kept row is <= threshold
    (SpLiCE: "we remove concepts with cosine similarity > 0.9 to a more frequent one"). The first
    ``protect`` rows are always kept (e.g. class names put in on purpose).
    """
    if emb.ndim != 2:
        raise ValueError(f"emb must be (K, D), got {tuple(emb.shape)}")
    x = F.normalize(emb.float(), dim=-1)
    sims = (x @ x.T).numpy()
    keep = np.zeros(len(x), dtype=bool)
    for i in range(len(x)):
        keep[i] = i < protect or not bool((sims[i, keep] > threshold).any())
    return np.flatnonzero(keep)


def center_normalize(x: Tensor, mean: Tensor | None) -> Tensor:
    """normalize(x - mean) row-wise; ``mean=None`` only normalises."""
    return F.normalize(x if mean is None else x - mean, dim=-1)


def lipschitz(dictionary: Tensor) -> float:
    """L = ||C||_2^2, the largest eigenvalue of C^T C (C given as rows: (K, D))."""
    return float(torch.linalg.matrix_norm(dictionary.double(), ord=2) ** 2)


@torch.no_grad()
def nonneg_lasso_fista(
    dictionary: Tensor,
    targets: Tensor,
    lam: float,
    *,
    n_iter: int = 300,
    tol: float = 1e-6,
    w0: Tensor | None = None,
    lipschitz_constant: float | None = None,
) -> tuple[Tensor, int]:
    """Batched projected FISTA for min_{w >= 0} (1/2)||w C - z||^2 + lam ||w||_1, per row of z.

    ``dictionary`` C: (K, D) concept rows; ``targets`` z: (B, D); returns (w (B, K), iterations).
    The minimiser equals SpLiCE's argmin ||Cw - z||^2 + 2 lam ||w||_1. ``w0`` warm-starts it
    (e.g. the solution at a larger lam). Stops when max |w_t - w_{t-1}| < tol.
    """
    if dictionary.ndim != 2 or targets.ndim != 2 or dictionary.shape[1] != targets.shape[1]:
        raise ValueError(
            f"need dictionary (K, D) and targets (B, D), got {tuple(dictionary.shape)}, "
            f"{tuple(targets.shape)}"
        )
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    c = dictionary.float()
    z = targets.float()
    step = 1.0 / (lipschitz_constant or lipschitz(c))
    w = torch.zeros(len(z), len(c)) if w0 is None else w0.float().clamp_min(0).clone()
    y, t = w.clone(), 1.0
    zc = z @ c.T  # (B, K), constant part of the gradient
    it = 0
    for it in range(1, n_iter + 1):
        grad = (y @ c) @ c.T - zc
        w_next = (y - step * grad - step * lam).clamp_min_(0.0)
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = w_next + ((t - 1.0) / t_next) * (w_next - w)
        delta = float((w_next - w).abs().max())
        w, t = w_next, t_next
        if delta < tol:
            break
    return w, it


def nonneg_lasso_sklearn(dictionary: Tensor, target: Tensor, lam: float) -> Tensor:
    """One target with scikit-learn's coordinate descent: Lasso(alpha = lam / D, positive=True).

    sklearn minimises (1/(2n)) ||y - X w||^2 + alpha ||w||_1 over n = D "samples" (the embedding
    coordinates), so alpha = lam / D gives the same minimiser as ``nonneg_lasso_fista``.
    """
    from sklearn.linear_model import Lasso

    c = dictionary.double().numpy()
    d = c.shape[1]
    model = Lasso(alpha=lam / d, positive=True, fit_intercept=False, max_iter=10_000, tol=1e-8)
    model.fit(c.T, target.double().numpy())
    return torch.from_numpy(model.coef_).float()


def splice(
    image_emb: Tensor,
    concept_emb: Tensor,
    lams: Sequence[float],
    *,
    center: bool = True,
    image_mean: Tensor | None = None,
    n_iter: int = 300,
    tol: float = 1e-5,
) -> list[dict[str, Tensor | float]]:
    """SpLiCE along a lambda path (largest first, each warm-started from the previous one).

    ``image_emb`` (B, D) CLIP image embeddings, ``concept_emb`` (K, D) concept text embeddings;
    with ``center`` the images are centred by ``image_mean`` (mu_img, from training images) and the
    concepts by their own mean. Returns per lambda a dict: ``lam``, ``w`` (B, K), ``z_hat`` (B, D)
    the reconstructed embedding in CLIP space, ``iterations``.
    """
    if center and image_mean is None:
        raise ValueError("center=True needs image_mean (the mean training image embedding)")
    mu_img = image_mean if center else None
    c = center_normalize(concept_emb, concept_emb.mean(0) if center else None)
    z = center_normalize(image_emb, mu_img)
    big_l = lipschitz(c)
    out: list[dict[str, Tensor | float]] = []
    w = None
    for lam in sorted(lams, reverse=True):
        w, it = nonneg_lasso_fista(
            c, z, lam, n_iter=n_iter, tol=tol, w0=w, lipschitz_constant=big_l
        )
        recon = w @ c
        z_hat = F.normalize(recon + mu_img if mu_img is not None else recon, dim=-1)
        out.append({"lam": float(lam), "w": w, "z_hat": z_hat, "iterations": it})
    return out


def l0(w: Tensor, eps: float = 0.0) -> float:
    """Mean number of concepts with weight > eps per image."""
    return float((w > eps).sum(1).float().mean())


def cosine(a: Tensor, b: Tensor) -> float:
    """Mean row-wise cosine similarity."""
    return float(F.cosine_similarity(a, b, dim=-1).mean())


def zero_shot_accuracy(emb: Tensor, class_weights: Tensor, labels: Tensor) -> float:
    """CLIP zero-shot accuracy: argmax_c <e, w_c> against ``labels``."""
    pred = (emb @ class_weights.T).argmax(1)
    return float((pred == labels).float().mean())


def random_dictionary(k: int, d: int, seed: int) -> Tensor:
    """K Gaussian directions in R^D (unit norm): a dictionary of the same size without semantics."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(k, d, generator=g), dim=-1)


def class_concept_profile(w: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """Mean concept weight per class (C, K): row c = mean of w over the images of class c."""
    prof = torch.zeros(n_classes, w.shape[1]).index_add_(0, labels, w)
    return prof / torch.bincount(labels, minlength=n_classes).clamp_min(1)[:, None].float()


def side_by_side(left: Tensor | None, right: Tensor | None, like: Tensor) -> Tensor:
    """Square canvas (B, 2H, 2W) with ``left`` in the left half and ``right`` in the right half,
    vertically centred, black elsewhere; ``None`` leaves that half black. Images (B, H, W).

    With black backgrounds the composite is exactly the sum of the two one-sided canvases:
    side_by_side(a, b) = side_by_side(a, None) + side_by_side(None, b).
    """
    b, h, w = like.shape
    canvas = torch.zeros(b, 2 * h, 2 * w, dtype=like.dtype)
    top = h // 2
    if left is not None:
        canvas[:, top : top + h, :w] = left
    if right is not None:
        canvas[:, top : top + h, w:] = right
    return canvas


def linearity_scores(
    composite: Tensor, first: Tensor, second: Tensor, other: Tensor
) -> dict[str, float]:
    """SpLiCE's linearity check on embeddings (each (B, D), unit norm).

    ``avg``: cos(e(a|b), normalize(e_a + e_b)); ``single``: the mean of cos(e(a|b), e_a) and
    cos(e(a|b), e_b), the similarity to either image alone; ``control``: cos(e(a|b), other), with
    ``other`` the average embedding of an unrelated pair.
    """
    avg = F.normalize(first + second, dim=-1)
    single = 0.5 * (
        F.cosine_similarity(composite, first, dim=-1)
        + F.cosine_similarity(composite, second, dim=-1)
    )
    return {
        "avg": cosine(composite, avg),
        "single": float(single.mean()),
        "control": cosine(composite, other),
    }


# --- the notebook's steps ------------------------------------------------------------------------
def eval_picks(
    emb_test: dict[str, Tensor], datasets: Sequence[str], n_eval: int, seed: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each seed's evaluation images: ``n_eval`` test rows per dataset (sorted), and the dataset
    of every row of their concatenation."""
    rng = np.random.default_rng(seed)
    picks = {
        n: np.sort(rng.choice(len(emb_test[n]), min(n_eval, len(emb_test[n])), replace=False))
        for n in datasets
    }
    part = np.concatenate([[n] * len(picks[n]) for n in datasets])
    return picks, part


def path_row(
    r: dict, e_eval: Tensor, part: np.ndarray, class_weights: dict, labels: dict
) -> dict[str, float]:
    """One lambda of a SpLiCE path: L0, cosine to the embeddings, and per dataset the zero-shot
    accuracy of the reconstruction (``acc_``), of the original embeddings (``orig_``) and L0."""
    row = {
        "lam": r["lam"],
        "l0": l0(r["w"]),
        "cosine": cosine(r["z_hat"], e_eval),
        "iterations": r["iterations"],
    }
    for n, lab in labels.items():
        m = torch.from_numpy(part == n)
        row[f"acc_{n}"] = zero_shot_accuracy(r["z_hat"][m], class_weights[n], lab)
        row[f"orig_{n}"] = zero_shot_accuracy(e_eval[m], class_weights[n], lab)
        row[f"l0_{n}"] = l0(r["w"][m])
    return row


def at_target(sweep, seed: int, config: str, column: str, target: float) -> float | None:
    """``column`` of one seed's sweep of ``config`` at L0 = ``target``, interpolated in log L0;
    None where the sweep does not reach the target (no extrapolation)."""
    from common.evals.frontier import interpolate_log_l0

    g = sweep[(sweep.seed == seed) & (sweep.config == config) & (sweep.l0 > 0)]
    try:
        return interpolate_log_l0(g.l0.to_list(), g[column].to_list(), target)
    except ValueError:
        return None


def nearest_lam(sweep, seed: int, config: str, target: float) -> float:
    """The lambda of one seed's sweep of ``config`` whose L0 is closest to ``target`` (in log)."""
    g = sweep[(sweep.seed == seed) & (sweep.config == config)]
    return float(g.lam[(np.log(g.l0.clip(lower=1e-3)) - np.log(target)).abs().idxmin()])


def linearity_check(clip, images: Tensor, labels: Tensor, emb: Tensor, n_pairs: int, g) -> dict:
    """The linearity scores of ``n_pairs`` composites a|b of images of different classes (drawn
    with generator ``g``): against the parts' embeddings and against the one-sided canvases."""
    i = torch.randint(len(labels), (4 * n_pairs,), generator=g)
    j = torch.randint(len(labels), (4 * n_pairs,), generator=g)
    ok = (labels[i] != labels[j]).nonzero()[:, 0][: 2 * n_pairs]
    a, b = i[ok[:n_pairs]], j[ok[:n_pairs]]
    c, d = i[ok[n_pairs:]], j[ok[n_pairs:]]
    canvases = torch.cat(
        [
            side_by_side(images[a], images[b], images[a]),
            side_by_side(images[a], None, images[a]),
            side_by_side(None, images[b], images[a]),
        ]
    )
    e = clip.project_image_features(clip.image_features(canvases))
    comp, left, right = e.split(len(a))
    other = F.normalize(emb[c] + emb[d], dim=-1)
    full = linearity_scores(comp, emb[a], emb[b], other)
    halves = linearity_scores(comp, left, right, other)
    return {**full, "avg_halves": halves["avg"], "single_halves": halves["single"]}


def exclusive_top(w: Tensor, n_top: int, exclude: Tensor | None = None) -> Tensor:
    """Per row of ``w`` (B, K), a mask of its ``n_top`` largest positive weights among the
    concepts not in ``exclude`` (B, K; True = left out)."""
    w = w.clone()
    if exclude is not None:
        w[exclude] = 0.0
    top = w.topk(min(n_top, w.shape[1]), dim=1).indices
    mask = torch.zeros_like(w, dtype=torch.bool).scatter_(1, top, True)
    return mask & (w > 0)


def weight_shares(
    w_a: Tensor, w_b: Tensor, w_c: Tensor, w_ab: Tensor, n_top: int
) -> dict[str, Tensor]:
    """How the decomposition of a composite a|b shares out its parts' concepts (rows: pairs).

    T_a = the ``n_top`` top concepts of a not among b's top ``n_top`` (and vice versa), T_c = the
    top concepts of an unrelated image c not among either's. The share of a's concepts is

        share_a = sum_{k in T_a} w_ab[k] / sum_{k in T_a} w_a[k]

    (the composite's weight on a's own concepts relative to a's weight on them): about 1/2 if the
    composite is the average of its parts (the paper's weight of about 0.5), about 0 for the
    unrelated c. NaN where a set is empty.
    """
    top_a, top_b = exclusive_top(w_a, n_top), exclusive_top(w_b, n_top)
    t_a = exclusive_top(w_a, n_top, top_b)
    t_b = exclusive_top(w_b, n_top, top_a)
    t_c = exclusive_top(w_c, n_top, top_a | top_b)

    def share(t: Tensor, own: Tensor) -> Tensor:
        den = (own * t).sum(1)
        return torch.where(den > 0, (w_ab * t).sum(1) / den.clamp_min(1e-12), torch.nan)

    return {"share_a": share(t_a, w_a), "share_b": share(t_b, w_b), "unrelated": share(t_c, w_c)}


def composite_shares(
    clip, images: Tensor, labels: Tensor, emb: Tensor, n_pairs: int, g, decompose, n_top: int
) -> dict[str, float]:
    """The decomposition test of linearity on ``n_pairs`` composites a|b (a, b of different
    classes) with an unrelated image c (a third class), drawn with generator ``g``;
    ``decompose`` maps embeddings (B, D) to SpLiCE weights (B, K). Means over the pairs of
    ``weight_shares``: ``pair_share`` (of a's and b's concepts) and ``unrelated_share``."""
    i, j, k = (torch.randint(len(labels), (8 * n_pairs,), generator=g) for _ in range(3))
    ok = (labels[i] != labels[j]) & (labels[k] != labels[i]) & (labels[k] != labels[j])
    keep = ok.nonzero()[:, 0][:n_pairs]
    a, b, c = i[keep], j[keep], k[keep]
    comp = clip.project_image_features(
        clip.image_features(side_by_side(images[a], images[b], images[a]))
    )
    w_a, w_b, w_c, w_ab = decompose(torch.cat([emb[a], emb[b], emb[c], comp])).split(len(a))
    s = weight_shares(w_a, w_b, w_c, w_ab, n_top)
    pair = torch.cat([s["share_a"], s["share_b"]])
    return {
        "pair_share": float(np.nanmean(pair.numpy())) if len(pair) else math.nan,
        "unrelated_share": float(np.nanmean(s["unrelated"].numpy())) if len(a) else math.nan,
        "n_pairs": int(len(a)),
    }


def _none_or(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def seed_metrics(
    seed: int, sweep, matched, semantics: dict, linearity: dict, l0_zero_shot: float
) -> dict:
    """One seed's metrics: the sweep, the matched-L0 comparison, the semantic judge, the
    linearity check, and under ``derived`` the numbers the claims compare (None: undefined)."""
    mt = matched[matched.seed == seed].set_index("config")
    sw = sweep[sweep.seed == seed]
    acc, cos = mt["accuracy"], mt["cosine"]
    both = mt.loc[["concepts", "random"], "accuracy"].notna().all()
    derived = {
        "original_accuracy": float(sw.original_accuracy.iloc[0]),
        "cosine_at_target": _none_or(cos["concepts"]),
        "accuracy_at_target": _none_or(acc["concepts"]),
        "accuracy_at_zero_shot_target": _none_or(
            at_target(sweep, seed, "concepts", "accuracy", l0_zero_shot)
        ),
        "cosine_at_zero_shot_target": _none_or(
            at_target(sweep, seed, "concepts", "cosine", l0_zero_shot)
        ),
        "cosine_uncentred_at_target": _none_or(cos["uncentred"]),
        "accuracy_uncentred_at_target": _none_or(acc["uncentred"]),
        "cosine_random_at_target": _none_or(cos["random"]),
        "accuracy_random_at_target": _none_or(acc["random"]),
        "accuracy_gain_over_random": _none_or(acc["concepts"] - acc["random"]) if both else None,
        "cosine_with_class_names_at_target": _none_or(cos["with_class_names"]),
        "accuracy_with_class_names_at_target": _none_or(acc["with_class_names"]),
        "judge_accuracy": semantics["judge_accuracy"],
        "judge_accuracy_shuffled": semantics["judge_accuracy_shuffled"],
        "judge_chance": 0.1,
        "judge_gain_over_shuffled": semantics["judge_accuracy"]
        - semantics["judge_accuracy_shuffled"],
        "top_is_own_name_with_class_names": semantics["top_is_own_name_with_class_names"],
        **{f"linearity_{k}": linearity[k] for k in ("avg", "single", "control")},
        **{f"linearity_{k}": linearity[k] for k in ("avg_halves", "single_halves")},
        "linearity_pair_weight_share": _none_or(linearity["pair_share"]),
        "linearity_unrelated_weight_share": _none_or(linearity["unrelated_share"]),
    }
    return {
        "sweep": {
            c: g.drop(columns=["seed", "config"]).to_dict("list") for c, g in sw.groupby("config")
        },
        "matched": {
            c: {k: _none_or(v) for k, v in r.items()} for c, r in mt.to_dict("index").items()
        },
        "semantics": semantics,
        "linearity": linearity,
        "derived": derived,
    }
