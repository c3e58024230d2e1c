"""The whole automatic-interpretability run over records of one or several direction bases.

    records = build_records(acts, token_ids, tokenizer, sae, n_latents=20, method="sae")
    records += build_records(acts, token_ids, tokenizer, direction_encoder(pca, both_signs=True),
                             n_latents=20, method="pca")
    result = run_autointerp(records, judge)
    result.summary            # per method x explanation x scorer: mean and bootstrap 95% CI
    result.sanity             # per method x scorer: real - random explanation (paired), CI

Every latent gets its explanation (from the judge), a random-explanation control (another
latent's explanation of the same method, a derangement) and a top-tokens control; each is scored
by detection and fuzzing (``scoring``). A judge is *sane* on these records when real explanations
beat random ones: the paired difference of AUROC has a bootstrap 95% interval above zero. If not,
the judge is too weak to read these latents (or the latents are unreadable): ``sanity`` says so.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from common.autointerp import scoring as S
from common.autointerp.records import LatentRecord, check_records

EXPLANATIONS = ("real", "random", "top_tokens")
SCORERS = ("detection", "fuzzing")


@dataclass
class AutointerpResult:
    """Per-latent rows, the summary across latents, the sanity check and the timings."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    sanity: list[dict[str, Any]]
    timing: dict[str, Any]
    explanations: dict[str, dict[str, str]] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "summary": self.summary,
            "sanity": self.sanity,
            "timing": self.timing,
            "rows": self.rows,
            "explanations": self.explanations,
        }

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (NaN as null)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(self.to_dict()), indent=1) + "\n")
        return path

    def table(self) -> str:
        """The summary as a Markdown table."""
        head = (
            "| method | explanation | scorer | latents | balanced acc. [95% CI] | AUROC [95% CI] |"
        )
        lines = [head, "|:--|:--|:--|--:|:--|:--|"]
        for s in self.summary:
            lines.append(
                f"| {s['method']} | {s['explanation']} | {s['scorer']} | {s['n_latents']} | "
                f"{_ci(s, 'balanced_accuracy')} | {_ci(s, 'auroc')} |"
            )
        return "\n".join(lines)


def _ci(s: dict[str, Any], key: str) -> str:
    m, lo, hi = s[key], s[key + "_lo"], s[key + "_hi"]
    return "n/a" if not np.isfinite(m) else f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.floating | np.integer):
        return _finite(obj.item())
    return obj


def _stats(judge: Any) -> dict[str, float]:
    stats = getattr(judge, "stats", None)
    return stats.as_dict() if stats is not None and hasattr(stats, "as_dict") else {}


def run_autointerp(
    records: Sequence[LatentRecord],
    judge: Any,
    *,
    explanations: dict[tuple[str, int], str] | None = None,
    controls: Sequence[str] = ("random", "top_tokens"),
    scorers: Sequence[str] = SCORERS,
    seed: int = 0,
    mark_frac: float = 0.3,
    n_boot: int = 2000,
    keep_examples: bool = False,
    progress: bool = True,
) -> AutointerpResult:
    """Explain every record's latent with ``judge`` (or take ``explanations[(method, latent)]``),
    build the controls, score everything, and summarise.

    ``controls``: any of ``random``, ``top_tokens``; ``scorers``: any of ``detection``,
    ``fuzzing``. The explanation is also written to ``record.explanation``.
    """
    check_records(records)
    unknown = (set(controls) - {"random", "top_tokens"}) | (set(scorers) - set(SCORERS))
    if unknown:
        raise ValueError(f"unknown controls / scorers {sorted(unknown)}; choose from "
                         f"controls ('random', 'top_tokens') and scorers {SCORERS}")  # fmt: skip
    start = time.perf_counter()
    bar = tqdm(records, desc="explain", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for r in bar:
        given = (explanations or {}).get((r.method, r.latent))
        r.explanation = given if given is not None else S.explain(judge, r, mark_frac=mark_frac)
    explain_seconds = time.perf_counter() - t0
    n_explained = len(records) if not explanations else sum(
        (r.method, r.latent) not in explanations for r in records
    )  # fmt: skip

    texts: dict[str, list[str]] = {"real": [r.explanation or "" for r in records]}
    if "random" in controls:
        texts["random"] = [""] * len(records)
        for method in dict.fromkeys(r.method for r in records):
            idx = [i for i, r in enumerate(records) if r.method == method]
            pool = idx if len(idx) >= 2 else list(range(len(records)))
            shuffled = S.random_explanations([texts["real"][i] for i in pool], seed)
            for i, text in zip(pool, shuffled):
                if i in idx:
                    texts["random"][i] = text
    if "top_tokens" in controls:
        texts["top_tokens"] = [S.top_tokens_explanation(r, mark_frac=mark_frac) for r in records]

    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    n_scored = 0
    jobs = [(i, kind) for i in range(len(records)) for kind in texts]
    for i, kind in tqdm(jobs, desc="score", disable=not progress, dynamic_ncols=True):
        r, text = records[i], texts[kind][i]
        for scorer in scorers:
            if scorer == "detection":
                ex = S.detect(judge, text, r)
            else:
                ex = S.fuzz(judge, text, r, seed=seed, mark_frac=mark_frac)
            n_scored += len(ex)
            rows.append({"method": r.method, "latent": r.latent, "explanation": kind,
                         "scorer": scorer, "text": text, **S.metrics(ex)})  # fmt: skip
            if keep_examples:
                examples += [
                    {"method": r.method, "latent": r.latent, "explanation": kind,
                     "scorer": scorer, **e.__dict__} for e in ex
                ]  # fmt: skip
    score_seconds = time.perf_counter() - t0

    summary, sanity = summarize(rows, n_boot=n_boot, seed=seed)
    timing = {
        "seconds": time.perf_counter() - start,
        "explain_seconds": explain_seconds,
        "score_seconds": score_seconds,
        "explanations_generated": n_explained,
        "contexts_scored": n_scored,
        "seconds_per_explanation": explain_seconds / max(n_explained, 1),
        "seconds_per_scored_context": score_seconds / max(n_scored, 1),
        "judge": getattr(judge, "name", type(judge).__name__),
        "judge_stats": _stats(judge),
    }
    expl = {kind: {f"{r.method}/{r.latent}": t for r, t in zip(records, v)}
            for kind, v in texts.items()}  # fmt: skip
    return AutointerpResult(rows, summary, sanity, timing, expl, examples)


def summarize(
    rows: Sequence[dict[str, Any]], *, n_boot: int = 2000, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(summary, sanity) from per-latent rows.

    summary: per (method, explanation, scorer) the mean over latents of balanced accuracy,
    AUROC and (detection) AUROC against close negatives, each with a bootstrap 95% CI.
    sanity: per (method, scorer), the paired difference real - random (and real - top_tokens) of
    AUROC over latents with its CI; ``judge_ok`` is True when real - random's CI is above 0.
    """
    keys = list(dict.fromkeys((r["method"], r["explanation"], r["scorer"]) for r in rows))
    summary = []
    for method, kind, scorer in keys:
        sel = [
            r
            for r in rows
            if (r["method"], r["explanation"], r["scorer"]) == (method, kind, scorer)
        ]
        entry: dict[str, Any] = {"method": method, "explanation": kind, "scorer": scorer,
                                 "n_latents": len(sel)}  # fmt: skip
        for metric in ("balanced_accuracy", "auroc", "auroc_close"):
            m, lo, hi = S.bootstrap_ci(
                [r.get(metric, np.nan) for r in sel], n_boot=n_boot, seed=seed
            )
            entry.update({metric: m, metric + "_lo": lo, metric + "_hi": hi})
        summary.append(entry)

    sanity = []
    for method, scorer in dict.fromkeys((m, s) for m, _, s in keys):
        by = {
            kind: {r["latent"]: r["auroc"] for r in rows
                   if (r["method"], r["scorer"], r["explanation"]) == (method, scorer, kind)}
            for kind in EXPLANATIONS
        }  # fmt: skip
        entry = {"method": method, "scorer": scorer}
        for other in ("random", "top_tokens"):
            common = sorted(set(by["real"]) & set(by[other]))
            diff = [by["real"][k] - by[other][k] for k in common]
            m, lo, hi = S.bootstrap_ci(diff, n_boot=n_boot, seed=seed)
            entry.update({f"real_minus_{other}": m, f"real_minus_{other}_lo": lo,
                          f"real_minus_{other}_hi": hi})  # fmt: skip
        lo = entry["real_minus_random_lo"]
        entry["judge_ok"] = bool(np.isfinite(lo) and lo > 0)
        entry["verdict"] = (
            "real explanations beat random ones" if entry["judge_ok"]
            else "NOT ABOVE RANDOM: the judge is too weak for these latents (or they are "
                 "unreadable); do not trust its scores"
        )  # fmt: skip
        sanity.append(entry)
    return summary, sanity
