"""Paper 17's figures: sample grids, the concept scores over timesteps, interference."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from torch import Tensor

from common.plots import apply_style


def tile(images: Tensor, cols: int) -> np.ndarray:
    """(N, C, S, S) -> one (H, W, C) array of rows of ``cols`` images, 1-px gaps (grey if C = 1)."""
    n, ch, s, _ = images.shape
    rows = int(np.ceil(n / cols))
    out = np.ones((rows * (s + 1), cols * (s + 1), ch))
    for i in range(n):
        r, c = divmod(i, cols)
        pixels = images[i].permute(1, 2, 0).numpy()
        out[r * (s + 1) : r * (s + 1) + s, c * (s + 1) : c * (s + 1) + s] = pixels
    return out[..., 0] if ch == 1 else out


def grid_figure(
    columns: Sequence[Tensor],
    titles: Sequence[str],
    names: Sequence[str],
    n_eval: int,
    per_cell: int,
    image_size: int,
    suptitle: str,
) -> plt.Figure:
    """Column blocks of sample sets (each ``len(names) * n_eval`` images, class-major); rows are
    the prompted classes, ``per_cell`` images of each."""
    apply_style()
    n_classes, m = len(names), min(per_cell, n_eval)
    size = (1.9 * len(columns) * m / 4 + 1.2, 0.42 * n_classes + 0.9)
    fig, axes = plt.subplots(1, len(columns), figsize=size, squeeze=False)
    for j, (ax, imgs, title) in enumerate(zip(axes[0], columns, titles)):
        pick = torch.cat([imgs[c * n_eval : c * n_eval + m] for c in range(n_classes)])
        ax.imshow(tile(pick, m), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ticks = [(c + 0.5) * (image_size + 1) for c in range(n_classes)]
        ax.set_yticks(ticks, names if j == 0 else [], fontsize=8)
        ax.grid(False)
    fig.suptitle(suptitle, fontsize=10)
    return fig


def concept_scores_figure(
    top_scores: Tensor,
    scores: Tensor,
    features: Tensor,
    timestep_values: Sequence[int],
    names: Sequence[str],
    target: int,
    tau: int,
) -> plt.Figure:
    """Left: mean score of the selected features per class and timestep; right: the scores of the
    target's selected features (seed 0: ``scores`` (C, T, S), ``features`` (C, T, tau))."""
    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    steps = range(len(timestep_values))
    labels = [str(t) for t in timestep_values]
    ax = axes[0]
    for c, name in enumerate(names):
        ax.plot(steps, top_scores[c].numpy(), marker="o", label=name)
    ax.set_xticks(steps, labels)
    ax.set(xlabel="timestep t (denoising runs left to right)", ylabel=f"mean score of top {tau}")
    ax.set_title("concept score of the selected features")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    s = scores[target]
    union = torch.unique(features[target].flatten())
    order = union[s[:, union].max(0).values.argsort(descending=True)][:20]
    lim = float(s.abs().max())
    im = ax.imshow(s[:, order].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(steps, labels)
    ax.set_yticks(range(len(order)), [str(i) for i in order.tolist()], fontsize=7)
    ax.set(xlabel="timestep t", ylabel="feature", title=f"scores of '{names[target]}' features")
    ax.grid(False)
    fig.colorbar(im, ax=ax)
    return fig


def interference_figure(inter: pd.DataFrame) -> plt.Figure:
    """Retention of similar vs dissimilar classes per unlearned class (mean ± std over seeds)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(8, 4))
    g = inter.groupby("targets")[["similar_retention", "dissimilar_retention"]].agg(["mean", "std"])
    x = np.arange(len(g))
    columns = [
        ("similar_retention", "similar classes"),
        ("dissimilar_retention", "dissimilar classes"),
    ]
    for j, (col, label) in enumerate(columns):
        ax.bar(x + (j - 0.5) * 0.38, g[(col, "mean")], 0.38, yerr=g[(col, "std")], label=label)
    ax.set_xticks(x, g.index, rotation=20)
    ax.set(ylabel="accuracy on their prompts", xlabel="unlearned class", ylim=(0, 1.05))
    ax.set_title("retention of similar vs dissimilar classes (mean ± std over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    return fig
