"""Paper 21's figures: the cross-reconstruction matrices, co-firing and firing entropy per latent,
and the most shared concepts seen from each model."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor
from usae import top_images

from common.plots import apply_style


def cross_reconstruction_figure(
    panels: Sequence[tuple[str, np.ndarray]], sites: Sequence[str]
) -> plt.Figure:
    """One heat map per (title, FVU matrix) panel: encode from model i (rows), decode to j."""
    apply_style()
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4))
    short = [s.replace("features", "final features") for s in sites]
    vmax = max(1.0, max(float(m.max()) for _, m in panels))
    for p, (ax, (name, m)) in enumerate(zip(axes, panels, strict=True)):
        im = ax.imshow(m, cmap="viridis_r", vmin=0, vmax=vmax)
        for i in range(len(sites)):
            for j in range(len(sites)):
                color = "k" if m[i, j] < 0.5 * vmax else "w"
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color=color, fontsize=12)
        ax.set_xticks(range(len(sites)), short)
        ax.set_yticks(range(len(sites)), short if p == 0 else [])
        ax.set(xlabel="decode to model j", title=name)
        ax.grid(False)
    axes[0].set_ylabel("encode from model i")
    fig.colorbar(im, ax=axes, shrink=0.8, label="test FVU (mean over seeds; lower is better)")
    return fig


def cofiring_figure(
    tables: dict[str, dict[str, np.ndarray]], shared_threshold: float, seed: int
) -> plt.Figure:
    """Histograms over alive latents of co-firing and firing entropy, for the USAE, the shuffled
    control and the USAE's codes with the image pairs permuted (``tables[kind]``: ``cofiring``)."""
    apply_style()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    bins = np.linspace(0, 1, 21)
    styles = {
        "usae": ("USAE", "C0"),
        "shuffled": ("shuffled-pairing control", "C3"),
        "permuted_pairs": ("USAE, image pairs permuted (chance)", "grey"),
    }
    for kind, (label, color) in styles.items():
        c = tables[kind]
        alive = c["alive"]
        hist = {"bins": bins, "histtype": "step", "lw": 2, "color": color, "label": label}
        axes[0].hist(c["cofire"][alive], **hist)
        if kind != "permuted_pairs":  # permuting images leaves firing counts, hence entropy, alone
            axes[1].hist(c["entropy"][alive], **hist)
    axes[0].axvline(shared_threshold, color="k", ls="--", lw=1, label="shared above")
    axes[0].set(
        xlabel="co-firing = #fire for both / #fire for either",
        ylabel="alive latents",
        title=f"co-firing on the same test images (seed {seed})",
    )
    axes[1].set(
        xlabel="firing entropy (1 = fires equally often from both)",
        ylabel="alive latents",
        title="firing entropy across the two models",
    )
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8, loc="upper left")
    return fig


def shared_concepts_figure(
    picked: Sequence[int],
    zs: Sequence[Tensor],
    cofire: np.ndarray,
    images: Sequence[Tensor],
    labels: Tensor,
    label_names: Sequence[str],
    sites: Sequence[str],
    n_top: int,
    seed: int,
) -> plt.Figure:
    """One row per latent of ``picked``: the ``n_top`` test images that excite it most encoded
    from model 1 (left) and from model 2 (right), with their class names."""
    apply_style()
    n_cols = 2 * n_top + 1
    n_rows = max(1, len(picked))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.3 * n_cols, 1.5 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, s in enumerate(picked):
        for side in range(2):
            for c, i in enumerate(top_images(zs[side], s, n_top).tolist()):
                ax = axes[r, c + side * (n_top + 1)]
                ax.imshow(images[i].numpy(), cmap="gray")
                ax.set_title(label_names[int(labels[i])].split("/")[1], fontsize=7)
        axes[r, 0].text(
            -0.15,
            0.5,
            f"latent {s}\nco-fire {cofire[s]:.2f}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    if picked:
        for side, col in enumerate((n_top // 2, n_top + 1 + n_top // 2)):
            axes[0, col].text(
                0.5,
                1.6,
                f"top images from {sites[side]}",
                transform=axes[0, col].transAxes,
                ha="center",
                fontsize=10,
            )
    title = f"most shared USAE latents (seed {seed}): test images that excite them most"
    fig.suptitle(title, y=1.02)
    return fig
