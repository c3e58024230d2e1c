"""Offline interpretability proxies for sets of directions (paper 1: Cunningham et al., ICLR 2024).

Cunningham et al. score a direction by LLM auto-interpretation of its top-activating contexts.
Offline we keep the *top-activating contexts* and replace the LLM by the labels of the documents
they come from (WordNet lexicographer categories): a monosemantic direction's top documents
should share a category.

For a direction with token activations a_t, a document D scores s_D = max_{t in D} a_t (one context
per document, so one long document cannot fill the top list by itself). With T_N the N documents
of largest score (only documents with s_D > 0 for a ReLU code):

    purity(T_N)  = max_c |{D in T_N : label(D) = c}| / N
    entropy(T_N) = - sum_c p_c log2 p_c,   p_c = |{D in T_N : label(D) = c}| / N

Signed bases (PCA, ICA, neurons, random directions) have no preferred sign, so each of their
directions v gives two candidates, +v and -v (``both_signs``).

``sparse_probe``: one-vs-rest k-sparse probing (Gurnee et al. 2023; common.evals.probing) on
document vectors built by mean-pooling each basis's activations over the document's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def both_signs(a: Tensor) -> Tensor:
    """(n, m) signed activations -> (n, 2m): the +v and -v readings of every direction."""
    return torch.cat([a, -a], dim=1)


def document_max(acts: Tensor, doc: np.ndarray, n_docs: int) -> Tensor:
    """s[D, j] = max over the tokens t of document D of acts[t, j]; -inf where D has no token."""
    index = torch.as_tensor(doc, dtype=torch.long)[:, None].expand_as(acts)
    out = torch.full((n_docs, acts.shape[1]), -torch.inf, dtype=acts.dtype)
    return out.scatter_reduce(0, index, acts, reduce="amax", include_self=True)


def document_mean(acts: Tensor, doc: np.ndarray, n_docs: int) -> Tensor:
    """Mean over each document's tokens (a document vector for probing); 0 where D has no token."""
    index = torch.as_tensor(doc, dtype=torch.long)
    total = torch.zeros(n_docs, acts.shape[1], dtype=acts.dtype).index_add_(0, index, acts)
    count = torch.bincount(index, minlength=n_docs).clamp_min(1).to(acts.dtype)
    return total / count[:, None]


def top_document_purity(
    doc_scores: Tensor, doc_labels: np.ndarray, n_top: int, *, positive_only: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Per direction: (purity, entropy in bits) of the labels of its ``n_top`` best documents.

    A direction with fewer than ``n_top`` scoring documents (finite, and > 0 if ``positive_only``)
    gets NaN: it has too few activating contexts to be judged (a dead or ultra-rare latent).
    """
    if not 0 < n_top <= doc_scores.shape[0]:
        raise ValueError(f"n_top must be in [1, {doc_scores.shape[0]} documents], got {n_top}")
    _, codes = np.unique(doc_labels, return_inverse=True)
    n_classes = int(codes.max()) + 1
    scores = doc_scores.clone()
    if positive_only:
        scores[scores <= 0] = -torch.inf
    n_valid = torch.isfinite(scores).sum(0).numpy()
    top = torch.topk(scores, k=n_top, dim=0).indices.numpy()  # (n_top, m)
    counts = np.zeros((scores.shape[1], n_classes))
    for row in codes[top]:  # one row of labels per rank
        np.add.at(counts, (np.arange(len(row)), row), 1.0)
    p = counts / n_top
    purity = p.max(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = 0.0 - np.nansum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
    purity[n_valid < n_top] = np.nan
    entropy[n_valid < n_top] = np.nan
    return purity, entropy


def random_document_purity(
    doc_labels: np.ndarray, n_top: int, n_draws: int, seed: int
) -> tuple[float, float]:
    """Chance level: mean (purity, entropy) of ``n_top`` documents drawn without replacement."""
    rng = np.random.default_rng(seed)
    _, codes = np.unique(doc_labels, return_inverse=True)
    purities, entropies = [], []
    for _ in range(n_draws):
        pick = codes[rng.choice(len(codes), size=n_top, replace=False)]
        p = np.bincount(pick) / n_top
        p = p[p > 0]
        purities.append(p.max())
        entropies.append(-(p * np.log2(p)).sum())
    return float(np.mean(purities)), float(np.mean(entropies))


def sparse_probe(
    doc_vectors: Tensor,
    doc_labels: np.ndarray,
    k: int,
    *,
    n_tasks: int,
    seed: int,
    test_fraction: float = 0.3,
    min_class_size: int = 10,
) -> float:
    """Mean test AUC of one-vs-rest k-sparse probes over the ``n_tasks`` most frequent labels.

    Labels with fewer than ``min_class_size`` documents on either side are skipped; NaN when no
    label qualifies (a tiny smoke run).

    The k directions are the ones with the largest |class-mean difference| on the training
    documents (``common.evals.probing.top_k_by_mean_difference``); the probe is a standardised,
    class-balanced logistic regression on those k columns only.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from common.evals.probing import top_k_by_mean_difference

    feats = doc_vectors.numpy().astype(np.float64)
    labels, counts = np.unique(doc_labels, return_counts=True)
    tasks = [lab for lab, c in sorted(zip(labels, counts), key=lambda t: -t[1])][:n_tasks]
    aucs = []
    for label in tasks:
        y = (doc_labels == label).astype(np.int64)
        if min(y.sum(), len(y) - y.sum()) < min_class_size:
            continue
        train, test = train_test_split(
            np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y
        )
        cols = top_k_by_mean_difference(feats[train], y[train], k)
        probe = make_pipeline(
            StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000)
        )
        probe.fit(feats[train][:, cols], y[train])
        aucs.append(roc_auc_score(y[test], probe.decision_function(feats[test][:, cols])))
    return float(np.mean(aucs)) if aucs else float("nan")


def mean_finite(values: Sequence[float] | np.ndarray) -> float:
    """Mean over the finite entries (NaN marks unscoreable directions); NaN if none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if len(arr) else float("nan")
