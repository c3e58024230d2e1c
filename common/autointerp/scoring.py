"""The explainer, the detection and fuzzing scorers, the control explanations and the metrics.

Scorers (delphi, Paulo et al. 2024; SAEBench, Karvonen et al. 2025):

* **detection**: the judge reads one unmarked excerpt and the explanation and says whether the
  feature is active in it. Positives are the record's held-out activating contexts (sampled across
  activation quantiles), negatives its random non-activating contexts *and* its close negatives
  (non-activating contexts that contain a token the latent fires on: an explanation that only
  names the token cannot reject them). ``auroc_close`` is the AUROC of the activating contexts
  against the close negatives alone.
* **fuzzing**: the judge sees an activating excerpt twice, once with the tokens where the latent
  fires marked ``<<like this>>`` (positive) and once with as many tokens marked at random among
  those where it does not fire (negative), and says whether the marks fit the explanation: does
  the explanation say *which* tokens fire, not only which texts.

Metrics per (latent, explanation, scorer): balanced accuracy of the answer P(yes) > 0.5, and
AUROC of P(yes) (threshold-free, so a judge biased towards "yes" or "no" is not penalised twice);
across latents, the mean with a percentile bootstrap 95% confidence interval over latents.

Controls: a *random* explanation (another latent's explanation, a seeded derangement) must score
near chance; a *top-tokens* explanation (the most frequent marked tokens of the explainer's
contexts, no model involved) tells how much the explanation adds beyond token identity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from common.autointerp import prompts as P
from common.autointerp.judges import Judge
from common.autointerp.records import Context, LatentRecord


# --- metrics -------------------------------------------------------------------------------------
def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve, P(score of a random positive > that of a random negative), ties
    counting one half (the Mann-Whitney U statistic / (n_pos n_neg)); NaN without both classes."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based, ties averaged
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def balanced_accuracy(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float = 0.5
) -> float:
    """(true-positive rate + true-negative rate) / 2 of the prediction ``score > threshold``;
    NaN without both classes. Chance is 0.5 whatever the class balance."""
    y = np.asarray(labels, dtype=bool)
    pred = np.asarray(scores, dtype=np.float64) > threshold
    if y.all() or (~y).all():
        return float("nan")
    return float(0.5 * (pred[y].mean() + (~pred[~y]).mean()))


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    stat: Callable[[np.ndarray], float] = np.mean,
) -> tuple[float, float, float]:
    """(statistic, lower, upper): the statistic of the finite ``values`` and its percentile
    bootstrap (1 - alpha) interval, resampling the values with replacement ``n_boot`` times.
    NaN for no finite value; a single value gives a zero-width interval."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n_boot, len(v)))
    try:  # numpy reductions take axis=1: one vectorised call
        boots = np.asarray(stat(v[idx], axis=1), dtype=np.float64)  # type: ignore[call-arg]
    except TypeError:
        boots = np.array([stat(v[i]) for i in idx])
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return float(stat(v)), float(lo), float(hi)


# --- marks ---------------------------------------------------------------------------------------
def firing_marks(context: Context, threshold: float = 0.0, mark_frac: float = 0.3) -> list[bool]:
    """Which tokens to mark: above ``threshold`` and at least ``mark_frac`` of the context's
    maximum (delphi marks relative to the example's maximum, so weak noise is not marked)."""
    top = context.max_act
    return [a > threshold and a >= mark_frac * top for a in context.acts]


def random_marks(marks: Sequence[bool], acts: Sequence[float], threshold: float,
                 rng: np.random.Generator) -> list[bool] | None:  # fmt: skip
    """As many marks as ``marks`` has, put at random on tokens that do not fire (else on any
    unmarked token); None if there is no such token."""
    k = int(sum(marks))
    pool = [i for i, a in enumerate(acts) if a <= threshold and not marks[i]]
    if len(pool) < k:
        pool = [i for i, m in enumerate(marks) if not m]
    if k == 0 or len(pool) < k:
        return None
    chosen = set(rng.choice(pool, size=k, replace=False).tolist())
    return [i in chosen for i in range(len(marks))]


# --- explanations --------------------------------------------------------------------------------
def explain(
    judge: Judge, record: LatentRecord, *, mark_frac: float = 0.3, max_tokens: int = 40
) -> str:
    """The explainer's description of a latent from its ``train`` contexts (top + quantile),
    activating tokens marked; greedy, so deterministic for a given judge."""
    excerpts = [
        P.mark(c.tokens, firing_marks(c, record.threshold, mark_frac)) for c in record.train
    ]
    if not excerpts:
        raise ValueError(f"latent {record.latent} has no train context to explain")
    return P.clean_explanation(judge.generate(P.explain_prompt(excerpts), max_tokens=max_tokens))


def top_tokens_explanation(record: LatentRecord, *, k: int = 3, mark_frac: float = 0.3) -> str:
    """The control explanation that names only tokens: the ``k`` most frequent marked tokens of
    the explainer's contexts, ``the tokens "a", "b", "c"``."""
    counts: Counter[str] = Counter()
    for c in record.train:
        for token, m in zip(c.tokens, firing_marks(c, record.threshold, mark_frac)):
            if m and token.strip():
                counts[P.show_token(token.strip())] += 1
    top = [t for t, _ in counts.most_common(k)] or [t.strip() for t in record.top_tokens[:k]]
    return "the tokens " + ", ".join(f'"{t}"' for t in top)


def random_explanations(explanations: Sequence[str], seed: int = 0) -> list[str]:
    """Each latent gets another latent's explanation (a seeded derangement: a random cycle), the
    random-explanation control. Needs at least two explanations."""
    n = len(explanations)
    if n < 2:
        raise ValueError("the random-explanation control needs at least two latents")
    order = np.random.default_rng(seed).permutation(n)
    out = [""] * n
    for i in range(n):
        out[order[i]] = explanations[order[(i + 1) % n]]
    return out


# --- scorers -------------------------------------------------------------------------------------
@dataclass
class Example:
    """One scored prompt: ground truth, the judge's P(yes), and what kind of example it was."""

    label: int
    p_yes: float
    kind: str
    text: str


def _p_yes(judge: Judge, messages: P.Messages) -> float:
    p = judge.score_choices(messages, P.CHOICES)
    return float(p[0])


def detect(judge: Judge, explanation: str, record: LatentRecord) -> list[Example]:
    """Detection scores of one explanation on the record's test / negative / close contexts."""
    items = [(c, 1, "activating") for c in record.test]
    items += [(c, 0, "negative") for c in record.negatives]
    items += [(c, 0, "close_negative") for c in record.close_negatives]
    out = []
    for context, label, kind in items:
        text = "".join(P.show_token(t) for t in context.tokens)
        out.append(Example(label, _p_yes(judge, P.detection_prompt(explanation, text)), kind, text))
    return out


def fuzz(
    judge: Judge,
    explanation: str,
    record: LatentRecord,
    *,
    seed: int = 0,
    mark_frac: float = 0.3,
) -> list[Example]:
    """Fuzzing scores: each test context with its firing tokens marked, and with random marks."""
    rng = np.random.default_rng([seed, record.latent])
    out = []
    for context in record.test:
        marks = firing_marks(context, record.threshold, mark_frac)
        wrong = random_marks(marks, context.acts, record.threshold, rng)
        if wrong is None:
            continue
        for label, m, kind in ((1, marks, "marked"), (0, wrong, "random_marks")):
            text = P.mark(context.tokens, m)
            out.append(
                Example(label, _p_yes(judge, P.fuzzing_prompt(explanation, text)), kind, text)
            )
    return out


def metrics(examples: Sequence[Example]) -> dict[str, float]:
    """Balanced accuracy, AUROC and counts of one scorer's examples; for detection also the AUROC
    against the close negatives only (``auroc_close``) and against random negatives only."""
    y = np.array([e.label for e in examples])
    p = np.array([e.p_yes for e in examples])
    out = {
        "balanced_accuracy": balanced_accuracy(y, p),
        "auroc": auroc(y, p),
        "n": float(len(examples)),
        "mean_p_yes": float(p.mean()) if len(p) else float("nan"),
    }
    kinds = np.array([e.kind for e in examples])
    if "close_negative" in kinds or "negative" in kinds:
        for name, kind in (("auroc_close", "close_negative"), ("auroc_random_neg", "negative")):
            sel = (y == 1) | (kinds == kind)
            out[name] = auroc(y[sel], p[sel]) if (kinds == kind).any() else float("nan")
    return out
