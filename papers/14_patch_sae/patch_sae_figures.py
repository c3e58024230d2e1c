"""Paper 14's figures: latent statistics, the activation funnel, heat-maps, zero-shot accuracy."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from patch_sae import ZERO_SHOT_VARIANTS, heatmap, reference_images, sae_codes

from common.plots import apply_style


def latent_statistics_figure(
    table: pd.DataFrame,
    label_starts: np.ndarray,
    p: Any,
    *,
    max_entropy: float,
    null_entropy: float,
    seed: int,
) -> plt.Figure:
    """Label entropy vs firing frequency (coloured by the dataset of the top class), and label std
    vs mean activation, for the latents with enough reference images."""
    apply_style()
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    ok = table[table.enough_references]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax = axes[0]
    ax.scatter(
        ok.firing_frequency,
        ok.label_entropy,
        c=[palette[np.searchsorted(label_starts, c, side="right") - 1] for c in ok.top_class],
        s=6,
        alpha=0.5,
    )
    ax.axhline(max_entropy, color="k", lw=1, ls="--", label="maximum, log min(#labels, top_k)")
    ax.axhline(null_entropy, color="grey", lw=1, ls=":", label=f"random {p.top_k} images")
    ax.axhline(p.selective_fraction * max_entropy, color="C3", lw=1, label="class-selective below")
    ax.set(
        xscale="log",
        xlabel="firing frequency (patch tokens)",
        ylabel="label entropy of reference images (nats)",
        title=f"latents of seed {seed}, coloured by dataset of their top class",
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.scatter(ok.mean_activation, ok.label_std, s=6, alpha=0.5, color=palette[2])
    ax.set(
        xlabel="mean activation where firing",
        ylabel="label std of reference images",
        title="mean activation vs label std",
    )
    return fig


def funnel_figure(
    table: pd.DataFrame,
    funnel: dict,
    patch_fires: torch.Tensor,
    label_names: list[str],
    n_images: int,
    n_patch: int,
    threshold: float,
) -> plt.Figure:
    """The share of patches, images and classes each alive latent reaches, and a_c[s] normalised
    over classes for up to three class-selective latents per class."""
    apply_style()
    n_labels = len(label_names)
    levels = pd.DataFrame(
        {
            "patch": (patch_fires / (n_images * n_patch)).numpy(),
            "image": (funnel["n_images"].float() / n_images).numpy(),
            "class": (funnel["n_classes"].float() / n_labels).numpy(),
        }
    )[table.alive.to_numpy()]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]})
    ax = axes[0]
    ax.boxplot([levels[c] for c in levels], showfliers=False)
    ax.set_xticks(range(1, len(levels.columns) + 1), ["patches", "images", "classes"])
    ax.set(
        yscale="log", ylabel="share reached per alive latent", title=f"funnel, tau = {threshold}"
    )
    ax = axes[1]
    selective = table[table.class_selective].sort_values(["top_class", "label_entropy"])
    shown = selective.groupby("top_class").head(3).index.to_numpy()
    if len(shown):
        a_c = funnel["class"][:, shown]
        a_c = a_c / a_c.sum(0, keepdim=True).clamp_min(1)
        im = ax.imshow(a_c.numpy(), aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax)
    ax.set_yticks(range(n_labels), label_names, fontsize=7)
    ax.grid(False)
    ax.set(xlabel="class-selective latents (up to 3 per class)", title="a_c[s] / sum_c a_c[s]")
    return fig


def heatmap_figure(
    sae: Any,
    table: pd.DataFrame,
    image_mean: torch.Tensor,
    train_images: list,
    train_patches: torch.Tensor,
    train_labels: torch.Tensor,
    label_names: list[str],
    p: Any,
    seed: int,
) -> plt.Figure | None:
    """The most frequent class-selective latents (one per top class), their top reference images
    with the patch activation overlaid; None when no latent is class-selective."""
    apply_style()
    ref_idx, ref_mask = reference_images(image_mean, p.top_k)
    pool = table[table.class_selective].sort_values("firing_frequency", ascending=False)
    picked = pool.drop_duplicates("top_class").index[: p.n_heatmap_latents].to_numpy()
    if not len(picked):
        return None
    big = [
        torch.nn.functional.interpolate(s.images[:, None].float(), size=(56, 56), mode="nearest")
        for s in train_images
    ]
    all_train_images = torch.cat(big)[:, 0]
    n_img = p.n_heatmap_images
    fig, axes = plt.subplots(
        len(picked), n_img, figsize=(1.8 * n_img, 1.9 * len(picked)), squeeze=False
    )
    for r, s_lat in enumerate(picked):
        rows_ = ref_idx[s_lat][ref_mask[s_lat]][:n_img]
        h, _ = sae_codes(sae, train_patches[rows_])
        for c in range(n_img):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(rows_):
                continue
            i = int(rows_[c])
            ax.imshow(all_train_images[i].numpy(), cmap="gray", extent=(0, 1, 0, 1))
            overlay = heatmap(h[c, :, s_lat], 56).numpy()
            ax.imshow(overlay, cmap="inferno", alpha=0.5, extent=(0, 1, 0, 1))
            ax.set_title(label_names[int(train_labels[i])].split("/")[1], fontsize=8)
        axes[r, 0].text(
            -0.1,
            0.5,
            f"latent {s_lat}\nH={table.label_entropy[s_lat]:.2f}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle(f"class-selective latents (seed {seed}): top images, patch activation overlaid")
    return fig


def zero_shot_figure(zero_shot: pd.DataFrame) -> plt.Figure:
    """Zero-shot accuracy of each token variant, per dataset (mean and std over seeds)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(7, 4))
    summary = zero_shot.groupby(["dataset", "variant"])["accuracy"].agg(["mean", "std"]).unstack(0)
    summary = summary.reindex(list(ZERO_SHOT_VARIANTS))
    summary["mean"].plot.bar(yerr=summary["std"], ax=ax, rot=0)
    ax.axhline(0.1, color="k", lw=1, ls="--", label="chance")
    ax.set(ylabel="zero-shot accuracy (test images)", xlabel="", title="tokens fed to the head")
    ax.legend(fontsize=8)
    return fig
