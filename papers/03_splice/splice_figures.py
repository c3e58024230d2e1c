"""Paper 03's figures: the sparsity trade-off, example decompositions and the linearity check."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import pandas as pd

from common.plots import apply_style

LABELS = {
    "concepts": "SpLiCE (centred)",
    "uncentred": "no centring",
    "with_class_names": "vocabulary + class names",
    "random": "random dictionary",
}


def tradeoff_figure(sweep: pd.DataFrame, p: Any, n_concepts: int, n_seeds: int) -> plt.Figure:
    """Cosine and zero-shot accuracy against L0 along the lambda sweep, one line per dictionary."""
    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for config, g in sweep[sweep.l0 > 0].groupby("config"):
        m = g.groupby("lam")[["l0", "cosine", "accuracy"]].mean().sort_values("l0")
        for ax, col in zip(axes, ["cosine", "accuracy"]):
            ax.plot(m.l0, m[col], marker="o", label=LABELS[config])
    axes[1].axhline(
        sweep.original_accuracy.mean(), color="k", ls="--", lw=1, label="original embeddings"
    )
    axes[1].axhline(0.1, color="grey", ls=":", lw=1, label="chance")
    for ax, yl in zip(
        axes, ["cosine(reconstruction, embedding)", "zero-shot accuracy (test, mean of datasets)"]
    ):
        ax.axvline(p.l0_target, color="grey", lw=0.8)
        ax.axvline(p.l0_zero_shot, color="grey", lw=0.8, ls=":")
        ax.set(xscale="log", xlabel="L0 (concepts per image)", ylabel=yl)
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"SpLiCE sweep over lambda, mean of {n_seeds} seeds; vocabulary {n_concepts} concepts"
    )
    return fig


def examples_figure(
    w0: Any,
    picks: dict,
    images_test: dict,
    labels_test: dict,
    class_names: dict,
    words: list[str],
    title: str,
) -> plt.Figure:
    """One evaluation image per class and dataset, with its top four concepts and weights."""
    apply_style()
    datasets = list(picks)
    fig, axes = plt.subplots(len(datasets), 10, figsize=(20, 3.4 * len(datasets)), squeeze=False)
    offset = 0
    for r, n in enumerate(datasets):
        lab = labels_test[n][picks[n]]
        for k in range(10):
            ax = axes[r, k]
            ax.axis("off")
            hit = (lab == k).nonzero()[:, 0]
            if len(hit) == 0:
                continue
            i = int(hit[0])
            ax.imshow(images_test[n][picks[n][i]].numpy(), cmap="gray")
            top = w0[offset + i].topk(4)
            text = "\n".join(
                f"{words[j]} {v:.2f}"
                for v, j in zip(top.values.tolist(), top.indices.tolist())
                if v > 0
            )
            ax.set_title(class_names[n][k], fontsize=10)
            ax.text(0.5, -0.05, text, transform=ax.transAxes, ha="center", va="top", fontsize=8)
        offset += len(picks[n])
    fig.suptitle(title)
    fig.subplots_adjust(hspace=0.6)
    return fig


def linearity_figure(linearity: dict) -> plt.Figure:
    """Left: the decomposition test, the composite's weight on each part's own concepts and on an
    unrelated image's (relative to their own weights), with the paper's 1/2 and the claim's band;
    right: the cosine diagnostics. Mean (std over seeds)."""
    apply_style()
    lin = pd.DataFrame(linearity).T
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4), width_ratios=(2, 5))
    shares = ["pair_share", "unrelated_share"]
    left.bar([0, 1], lin[shares].mean(), yerr=lin[shares].std(), color=["C0", "C7"])
    left.axhspan(0.25, 0.75, color="C2", alpha=0.12, label="claim: |share - 1/2| <= 1/4")
    left.axhline(0.5, color="C2", ls="--", lw=1, label="paper: about 1/2")
    left.set_xticks(
        [0, 1], ["the pair's own\nconcepts", "an unrelated image's\nconcepts (control)"]
    )
    left.set(ylabel="composite weight / own weight", title="decomposing a|b")
    left.legend(fontsize=7)
    cols = ["avg", "avg_halves", "single", "single_halves", "control"]
    right.bar(
        range(len(cols)),
        lin[cols].mean(),
        yerr=lin[cols].std(),
        color=[f"C{i}" for i in range(len(cols))],
    )
    right.set_xticks(
        range(len(cols)),
        [
            "composite vs\naverage",
            "same, one-sided\ncanvases as parts",
            "composite vs\neither image",
            "same, one-sided\ncanvases as parts",
            "composite vs unrelated\npair (control)",
        ],
        fontsize=8,
    )
    right.set(ylabel="cosine", title="diagnostics: cosines (avg > single holds by algebra)")
    return fig
