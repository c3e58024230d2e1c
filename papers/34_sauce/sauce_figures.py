"""Paper 34's figures: the unlearning / retention trade-off, per-concept scores and the top
images of the selected features."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from sauce import top_activating

from common.plots import apply_style


def tradeoff_figure(
    grid: pd.DataFrame, readouts: Sequence[str], gammas: Sequence[float], metric_cols: list[str]
) -> plt.Figure:
    """UA against IRA for each (k, gamma) of the sweep (mean over concrete concepts and seeds),
    SAUCE-selected against random features, one panel per read-out."""
    apply_style()
    concrete = grid[~grid.abstract]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, readout in zip(axes, readouts):
        ua, ira = f"ua_{readout}", f"ira_{readout}"
        for method, marker in (("SAUCE", "o"), ("random", "x")):
            g = concrete[concrete.method == method].groupby(["k", "gamma"])[metric_cols].mean()
            for gi, gamma in enumerate(gammas):
                sub = g.xs(gamma, level="gamma")
                ax.plot(
                    sub[ira],
                    sub[ua],
                    marker=marker,
                    color=f"C{gi}",
                    ls="-" if method == "SAUCE" else ":",
                    label=f"{method}, gamma={gamma:g}",
                )
                for k, r in sub.iterrows():
                    ax.annotate(
                        f"k={k}",
                        (r[ira], r[ua]),
                        fontsize=7,
                        xytext=(3, 3),
                        textcoords="offset points",
                    )
        ref = concrete[concrete.method == "no edit"][metric_cols].mean()
        ax.scatter([ref[ira]], [ref[ua]], color="k", marker="*", s=120, zorder=5, label="no edit")
        ax.set(
            xlabel="in-domain retention (IRA)",
            ylabel="unlearning accuracy (UA)",
            title=f"{readout.replace('_', '-')} read-out, concrete concepts",
        )
    axes[0].legend(fontsize=7)
    return fig


def per_concept_figure(
    main: pd.DataFrame, names: list[str], metric_cols: list[str], title: str
) -> plt.Figure:
    """UA, IRA and CRA of the probe read-out per concept at the operating point: SAUCE with and
    without the error term (bars), random features and no edit (markers)."""
    apply_style()
    per = main.groupby(["concept", "method"])[metric_cols].mean()
    fig, axes = plt.subplots(3, 1, figsize=(12, 8), sharex=True)
    xs = np.arange(len(names))
    for ax, metric, label in zip(
        axes, ("ua", "ira", "cra"), ("UA", "in-domain retention", "cross-domain retention")
    ):
        col = f"{metric}_probe"
        ax.bar(xs - 0.2, [per.loc[(n, "SAUCE"), col] for n in names], 0.4, label="SAUCE")
        no_error = [per.loc[(n, "SAUCE, no error term"), col] for n in names]
        ax.bar(xs + 0.2, no_error, 0.4, label="SAUCE, no error term", alpha=0.6)
        random = [per.loc[(n, "random"), col] for n in names]
        ax.scatter(xs, random, color="k", marker="x", zorder=5, label="random features")
        original = [per.loc[(n, "no edit"), col] for n in names]
        ax.scatter(xs, original, color="C3", marker="_", s=200, zorder=5, label="no edit")
        ax.set(ylabel=label, ylim=(0, 1.05))
    axes[0].legend(fontsize=7, ncol=4, loc="lower right")
    axes[0].set_title(title)
    axes[-1].set_xticks(xs, names, rotation=30, ha="right")
    return fig


def top_images_figure(
    shown: list,
    selected: dict,
    seed: int,
    train_codes: torch.Tensor,
    train_images: torch.Tensor,
    train_names: list[str],
    n_features: int,
    n_images: int,
) -> plt.Figure:
    """For each concept in ``shown``, the top-activating training images of its top features."""
    apply_style()
    n_rows = len(shown) * n_features
    fig, axes = plt.subplots(
        n_rows, n_images, figsize=(1.5 * n_images, 1.6 * n_rows), squeeze=False
    )
    for ci, concept in enumerate(shown):
        for fi, feat in enumerate(selected[seed, concept.name][:n_features].tolist()):
            r = ci * n_features + fi
            idx = top_activating(train_codes, feat, n_images)
            for j in range(n_images):
                ax = axes[r, j]
                ax.axis("off")
                if j < len(idx):
                    ax.imshow(train_images[idx[j]].numpy(), cmap="gray")
                    ax.set_title(train_names[idx[j]], fontsize=7)
            axes[r, 0].text(
                -0.15,
                0.5,
                f"{concept.name}\nfeature {feat}",
                transform=axes[r, 0].transAxes,
                ha="right",
                va="center",
                fontsize=8,
            )
    fig.suptitle(f"top-activating training images of each concept's top-{n_features} features")
    return fig
