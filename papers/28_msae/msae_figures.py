"""Paper 28's figures: the sparsity-fidelity frontier, the naming grid and concept steering."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from msae import code_neighbours, steer

from common.plots import apply_style

STYLE = {
    "msae": dict(marker="o", color="C0", label="MSAE (TopK$_k$ at inference)"),
    "topk": dict(marker="s", color="C1", label="TopK (one SAE per k)"),
    "topk_single": dict(marker="v", color="C1", ls=":", label="TopK (single, largest k)"),
    "relu": dict(marker="^", color="C2", label="ReLU + L1"),
    "msae_relu": dict(marker="*", color="C0", ls="", ms=14, label="MSAE (ReLU at inference)"),
}


def frontier_figure(
    frontier: pd.DataFrame, matched: dict, zero_shot_original: float, title: str
) -> plt.Figure:
    """FVU, cosine and zero-shot accuracy against L0 per family (mean +- std over seeds)."""
    apply_style()
    summary = frontier.groupby(["family", "setting"], sort=False)[
        ["l0", "fvu", "cosine", "zero_shot"]
    ]
    mean, std = summary.mean(), summary.std().fillna(0)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
    for ax, metric, label in zip(
        axes, ("fvu", "cosine", "zero_shot"), ("FVU (test)", "cos(x, x_hat)", "zero-shot accuracy")
    ):
        for fam, kw in STYLE.items():
            if fam not in mean.index.get_level_values(0):
                continue
            m = mean.loc[fam].sort_values("l0")
            s = std.loc[fam].reindex(m.index)
            ax.errorbar(m.l0, m[metric], yerr=s[metric], capsize=2, **kw)
        if metric == "zero_shot":
            ax.axhline(zero_shot_original, color="k", ls="--", lw=1, label="original embeddings")
        l0_star = [r["fvu"]["l0"] for r in matched.values() if r["fvu"]["l0"]]
        if l0_star:
            ax.axvline(np.mean(l0_star), color="grey", lw=1, ls=":", label="matched $L_0^*$")
        ax.set(xscale="log", xlabel="$L_0$ (active latents per embedding)", ylabel=label)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def naming_grid_figure(
    z: torch.Tensor,
    names: np.ndarray,
    best: np.ndarray,
    stats: dict,
    test_images: Sequence[torch.Tensor],
    test_labels: torch.Tensor,
    class_words: list[str],
    vocab: list[str],
    p: Any,
    seed: int,
) -> plt.Figure | None:
    """Named latents (one per class name first, most frequent first, then a few other words),
    each with its top test images; None when no latent is named."""
    apply_style()
    n_labels = len(class_words)
    named = [
        j
        for j in np.argsort(-stats["n_fire"])
        if names[j] >= 0 and not np.isnan(stats["purity"][j])
    ]
    other = [j for j in named if names[j] >= n_labels][: p.n_show_latents // 3]
    seen, chosen = set(), []
    for j in (j for j in named if names[j] < n_labels):
        if names[j] not in seen:
            seen.add(names[j])
            chosen.append(j)
    chosen = chosen[: p.n_show_latents - len(other)] + other
    if not chosen:
        return None
    n_img = p.n_show_images
    fig, axes = plt.subplots(
        len(chosen), n_img, figsize=(1.5 * n_img + 2, 1.6 * len(chosen)), squeeze=False
    )
    for r, j in enumerate(chosen):
        top = torch.topk(z[:, j], n_img).indices.tolist()
        for c in range(n_img):
            ax = axes[r, c]
            ax.axis("off")
            ax.imshow(test_images[top[c]].numpy(), cmap="gray")
            ax.set_title(class_words[int(test_labels[top[c]])], fontsize=7)
        axes[r, 0].text(
            -0.15,
            0.5,
            f"latent {j}\n'{vocab[names[j]]}'\ncos {best[j]:.2f}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle(f"MSAE latents named by their closest word (seed {seed}); top test images")
    return fig


def steering_grid_figure(
    z_q: torch.Tensor,
    z_gal: torch.Tensor,
    c: int,
    unit: float,
    query_image: torch.Tensor,
    gallery_images: Sequence[torch.Tensor],
    gallery_labels: torch.Tensor,
    target: int,
    class_words: list[str],
    strengths: Sequence[float],
    n_neighbours: int,
    title: str,
) -> plt.Figure:
    """One query (code ``z_q``, (1, d_sae)) and its neighbours as latent ``c`` is raised by each
    strength (red titles: the target class)."""
    apply_style()
    fig, axes = plt.subplots(
        len(strengths),
        n_neighbours + 1,
        figsize=(1.3 * (n_neighbours + 1), 1.45 * len(strengths)),
        squeeze=False,
    )
    for r, a in enumerate(strengths):
        idx, _ = code_neighbours(steer(z_q, c, a, unit), z_gal, n_neighbours)
        ax = axes[r, 0]
        ax.imshow(query_image.numpy(), cmap="gray")
        ax.set_title(f"query, a={a:g}", fontsize=7)
        ax.axis("off")
        for col, g in enumerate(idx[0].tolist()):
            ax = axes[r, col + 1]
            ax.imshow(gallery_images[g].numpy(), cmap="gray")
            hit = int(gallery_labels[g]) == target
            ax.set_title(
                class_words[int(gallery_labels[g])], fontsize=7, color="C3" if hit else "k"
            )
            ax.axis("off")
    fig.suptitle(title)
    return fig


def steering_share_figure(
    steering: dict,
    strengths: Sequence[float],
    n_neighbours: int,
    read_at: dict | None = None,
) -> plt.Figure:
    """The share of neighbours of the target class and of the query's class against strength
    (the whole curve, mean and std over seeds), the identity floor own(0) / 2 and each seed's
    read-out strength ``read_at[seed]`` (dotted)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for key, label, color in (
        ("target_share", "target class", "C3"),
        ("query_class_share", "query's class", "C0"),
    ):
        vals = np.array([[steering[s][key][a] for a in strengths] for s in steering])
        ax.errorbar(
            strengths,
            vals.mean(0),
            yerr=vals.std(0),
            marker="o",
            color=color,
            label=label,
            capsize=2,
        )
    floor = np.mean([steering[s]["query_class_share"][strengths[0]] / 2 for s in steering])
    ax.axhline(floor, color="C0", ls="--", lw=1, label="identity floor: own(0) / 2")
    for i, a in enumerate(sorted(set((read_at or {}).values()))):
        label = "read-out strength a* (per seed)" if i == 0 else None
        ax.axvline(a, color="k", ls=":", lw=1.2, label=label)
    ax.set(
        xlabel="steering strength a (x mean concept activation)",
        ylabel=f"share of the {n_neighbours} neighbours",
        title="concept steering of retrieval",
    )
    ax.legend(fontsize=8)
    return fig
