"""k-sparse probing of SAE latents on labelled text (paper 31: Kantamneni et al., ICML 2025).

Each document becomes one activation vector: the site's activation at the document's **last
token** (the paper's choice; ``pooling="mean"`` averages the positions after the BOS instead), see
``document_activations``. For a binary task (positive class P against negatives N), on a seeded
stratified train/test split:

    z              = SAE codes of the document vectors x
    score_i        = | mean_{train, y=1} z_i - mean_{train, y=0} z_i |   (class-mean difference)
    S_k            = the k latents with the largest score_i
    probe          = logistic regression (L1 by default, as in the paper; features standardised,
                     balanced class weights) fitted on z[:, S_k] of the training documents
    AUC, accuracy  on the test documents

Baselines on the same split: the same probe on all d raw dimensions of x (``raw_full``), and on k
raw dimensions picked by the same class-mean difference (``raw_k``). Paper 31's finding is that
SAE probes rarely beat the full raw-activation probe.

Tasks: two labels give one task; with more, one-vs-rest for the ``max_tasks`` most frequent labels
(e.g. WordNet's lexicographer categories). ``tasks=[("positive", "negative")]`` picks labels
explicitly (documents with other labels, e.g. neutral tweets, are dropped); a negative label of
``None`` means "every other label".
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.evals.downstream import (
    bos_token_id,
    sae_codes,
    sequence_site,
    site_activations,
    unwrap_model,
)
from common.sae.base import SAE

Task = tuple[str, str | None]


@torch.no_grad()
def document_activations(
    model: Any,
    site: str,
    texts: Sequence[str],
    tokenizer: Any = None,
    *,
    pooling: str = "last",
    max_len: int = 64,
    batch_size: int = 16,
) -> Tensor:
    """One (d,) vector per document: the site's activation at its last token (or the mean).

    Each document is tokenised as [BOS] + its first ``max_len - 1`` tokens (as
    ``common.data.text.tokenize_windows``: the tokenizer's BOS, else EOS/CLS), right-padded within a
    batch (causal attention: padding after a token cannot change it). ``pooling="mean"`` averages
    positions 1 .. len-1, leaving out the BOS attention sink.
    """
    if pooling not in ("last", "mean"):
        raise ValueError(f"pooling must be 'last' or 'mean', got {pooling!r}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one string; wrap it in a list")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= or a LoadedModel that has one")
    net = unwrap_model(model)
    resolved = sequence_site(net, site)
    bos = bos_token_id(tokenizer)
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    docs = [([] if bos is None else [bos]) + list(ids)[: max_len - 1] for ids in encoded]
    empty = [i for i, ids in enumerate(docs) if len(ids) < 2]
    if empty:
        raise ValueError(f"documents {empty[:5]} are empty after tokenisation; drop them first")
    out = []
    for start in range(0, len(docs), batch_size):
        chunk = docs[start : start + batch_size]
        length = torch.tensor([len(ids) for ids in chunk])
        ids = torch.full((len(chunk), int(length.max())), pad, dtype=torch.long)
        for row, doc in enumerate(chunk):
            ids[row, : len(doc)] = torch.tensor(doc)
        positions = torch.arange(ids.shape[1])[None]
        mask = (positions < length[:, None]).long()
        acts = site_activations(net, resolved, ids, mask).float().cpu()
        if pooling == "last":
            out.append(acts[torch.arange(len(chunk)), length - 1])
        else:
            body = (mask.bool() & (positions >= 1)).float()[..., None]
            out.append((acts * body).sum(1) / body.sum(1))
    return torch.cat(out)


def default_tasks(labels: Sequence[str], max_tasks: int = 8) -> list[Task]:
    """Two labels: one task (second sorted label vs the first); more: one-vs-rest, most frequent."""
    counts = Counter(labels)
    if len(counts) < 2:
        raise ValueError(f"probing needs at least two labels, got {sorted(counts)}")
    if len(counts) == 2:
        neg, pos = sorted(counts)
        return [(pos, neg)]
    return [(label, None) for label, _ in counts.most_common(max_tasks)]


def _task_name(task: Task) -> str:
    pos, neg = task
    name = f"{pos}_vs_{'rest' if neg is None else neg}"
    return re.sub(r"[^\w.+-]", "_", name)


def top_k_by_mean_difference(features: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k columns with the largest |mean over y=1 - mean over y=0| (paper 31)."""
    score = np.abs(features[y == 1].mean(0) - features[y == 0].mean(0))
    k = min(k, features.shape[1])
    return np.argsort(-score, kind="stable")[:k]


def _fit_and_score(
    train: np.ndarray,
    y_train: np.ndarray,
    test: np.ndarray,
    y_test: np.ndarray,
    penalty: str,
    C: float,
) -> tuple[float, float]:
    """Test (AUC, accuracy) of a standardised logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    l1_ratio = 1.0 if penalty == "l1" else 0.0
    probe = make_pipeline(
        StandardScaler(),
        LogisticRegression(
            l1_ratio=l1_ratio, C=C, solver="liblinear", class_weight="balanced", max_iter=2000
        ),
    )
    probe.fit(train, y_train)
    scores = probe.decision_function(test)
    return float(roc_auc_score(y_test, scores)), float(((scores > 0) == y_test).mean())


def sparse_probing(
    sae: SAE,
    x: Tensor,
    labels: Sequence[str],
    ks: Sequence[int] = (1, 2, 5, 20),
    *,
    tasks: Sequence[Task] | None = None,
    max_tasks: int = 8,
    test_fraction: float = 0.2,
    seed: int = 0,
    penalty: str = "l1",
    C: float = 1.0,
    min_class_size: int = 10,
) -> dict[str, float]:
    """k-sparse probes on SAE latents vs raw-activation probes (module docstring).

    ``x``: (n_docs, d) document vectors (``document_activations``); ``labels``: one per document.
    Returns, per task T and k: ``probe_{T}_sae_k{k}_auc`` / ``_acc``, ``probe_{T}_raw_k{k}_auc``
    / ``_acc``, ``probe_{T}_raw_full_auc`` / ``_acc``; the same keys without ``{T}_`` are means
    over tasks; ``probe_n_tasks``. Tasks with fewer than ``min_class_size`` documents in a class
    are skipped.
    """
    from sklearn.model_selection import train_test_split

    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(
            f"x must be (n_docs, d) with one label per document; got x {tuple(x.shape)} and "
            f"{len(labels)} labels"
        )
    if not ks or any(int(k) <= 0 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    if penalty not in ("l1", "l2"):
        raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
    labels_arr = np.asarray(labels)
    known = set(labels_arr.tolist())
    tasks = list(tasks) if tasks is not None else default_tasks(list(labels), max_tasks)
    for pos, neg in tasks:
        missing = [lab for lab in (pos, neg) if lab is not None and lab not in known]
        if missing:
            raise ValueError(f"task ({pos!r}, {neg!r}): labels {missing} not in {sorted(known)}")

    z_np, x_np = sae_codes(sae, x).numpy(), x.float().cpu().numpy()

    metrics: dict[str, float] = {}
    per_key: dict[str, list[float]] = {}
    for task in tasks:
        pos, neg = task
        rows = np.ones(len(labels_arr), bool) if neg is None else np.isin(labels_arr, [pos, neg])
        y = (labels_arr[rows] == pos).astype(np.int64)
        if min(y.sum(), (1 - y).sum()) < min_class_size:
            continue
        index = np.flatnonzero(rows)
        train, test = train_test_split(
            index, test_size=test_fraction, random_state=seed, stratify=y
        )
        y_train = (labels_arr[train] == pos).astype(np.int64)
        y_test = (labels_arr[test] == pos).astype(np.int64)
        name = _task_name(task)
        results: dict[str, tuple[float, float]] = {
            "raw_full": _fit_and_score(x_np[train], y_train, x_np[test], y_test, penalty, C)
        }
        for k in ks:
            for kind, feats in (("sae", z_np), ("raw", x_np)):
                cols = top_k_by_mean_difference(feats[train], y_train, int(k))
                results[f"{kind}_k{k}"] = _fit_and_score(
                    feats[train][:, cols], y_train, feats[test][:, cols], y_test, penalty, C
                )
        for probe, (auc, acc) in results.items():
            for metric, value in (("auc", auc), ("acc", acc)):
                metrics[f"probe_{name}_{probe}_{metric}"] = value
                per_key.setdefault(f"probe_{probe}_{metric}", []).append(value)
    if not per_key:
        raise ValueError(
            f"no task has {min_class_size} documents in both classes; pass more documents or "
            "lower min_class_size"
        )
    metrics.update({key: float(np.mean(values)) for key, values in per_key.items()})
    metrics["probe_n_tasks"] = float(len(per_key["probe_raw_full_auc"]))
    return metrics
