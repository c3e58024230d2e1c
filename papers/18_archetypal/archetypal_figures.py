"""Paper 18's figures: stability, stability vs reconstruction, matched cosines, plausibility and
the matched-atom grid."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from archetypal_stability import METHODS, REFERENCES, matched_atoms, top_images

from common.plots import apply_style

LABELS = {
    "topk": "TopK SAE",
    "archetypal": "A-SAE",
    "ra": "RA-SAE",
    "nmf": "NMF",
    "kmeans": "k-means",
    "data_points": "data points",
    "random": "random",
}
TITLES = {
    "seeds": "same data, different seeds",
    "subsets": "same seed, disjoint halves of the data",
}
ORDER = METHODS + REFERENCES


def palette() -> dict[str, str]:
    apply_style()
    return dict(zip(ORDER, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))


def stability_figure(stab: pd.DataFrame) -> plt.Figure:
    """Per method and variant: the stability of each pair, at initialisation, mean removed."""
    colors = palette()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.3), sharey=True)
    for ax, variant in zip(axes, ["seeds", "subsets"], strict=True):
        d = stab[stab.variant == variant]
        means = d.groupby("method")["stability"].mean().reindex(ORDER)
        ax.bar(range(len(ORDER)), means, color=[colors[m] for m in ORDER], alpha=0.6)
        for j, m in enumerate(ORDER):
            pts = d[d.method == m]
            ax.scatter(np.full(len(pts), j), pts.stability, color="k", s=14, zorder=3)
            init = pts.at_init.dropna()
            if len(init):
                ax.scatter(
                    np.full(len(init), j + 0.25), init, marker="x", color="C3", s=20, zorder=3
                )
            ax.scatter(
                np.full(len(pts), j - 0.25), pts.mean_removed, marker="v", color="grey", s=14
            )
        ax.axhline(0.92, color="k", lw=1, ls="--")
        ax.set_xticks(range(len(ORDER)), [LABELS[m] for m in ORDER], rotation=30)
        ax.set(title=TITLES[variant], ylim=(0, 1.02))
    axes[0].set_ylabel("stability: mean Hungarian-matched cosine")
    handles = [
        plt.Line2D([], [], color="k", marker="o", ls="", label="pair of runs"),
        plt.Line2D([], [], color="C3", marker="x", ls="", label="same pair at initialisation"),
        plt.Line2D([], [], color="grey", marker="v", ls="", label="mean direction removed"),
        plt.Line2D([], [], color="k", ls="--", label="paper: A-SAE > 0.92"),
    ]
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    return fig


def stability_vs_fvu_figure(stab: pd.DataFrame, recon_all: pd.DataFrame, pairs: dict) -> plt.Figure:
    """Stability vs reconstruction: each pair of runs, FVU averaged over its two runs."""
    colors = palette()
    fvu_of = recon_all.set_index(["variant", "method", "key"])["fvu"]
    fig, ax = plt.subplots(figsize=(6.8, 4.5))
    for variant, marker, fill in (("seeds", "o", True), ("subsets", "s", False)):
        for method in METHODS:
            d = stab[(stab.variant == variant) & (stab.method == method)]
            fvus = [
                (fvu_of[(variant, method, a)] + fvu_of[(variant, method, b)]) / 2
                for a, b in pairs[variant]
            ]
            ax.scatter(
                fvus,
                d.stability,
                s=40,
                marker=marker,
                label=f"{LABELS[method]}, {TITLES[variant]}",
                color=colors[method] if fill else "none",
                edgecolor=colors[method],
            )
    ax.set(
        xlabel="FVU on held-out features (lower is better)",
        ylabel="stability of the pair",
        title="stability vs reconstruction, one point per pair of runs",
    )
    ax.legend(fontsize=7, loc="lower right")
    return fig


def matched_cosines_figure(matched: dict, seeds: list[int]) -> plt.Figure:
    """Distribution of the matched cosines of all atoms (all pairs pooled)."""
    colors = palette()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    bins = np.linspace(-0.2, 1, 49)
    for ax, variant in zip(axes, ["seeds", "subsets"], strict=True):
        for method in METHODS + ["nmf", "data_points"]:
            cos = torch.cat([matched[(variant, method, s)] for s in seeds]).numpy()
            ax.hist(
                cos,
                bins=bins,
                histtype="step",
                lw=1.6,
                color=colors[method],
                label=LABELS[method],
                density=True,
            )
        ax.set(xlabel="cosine of matched atoms", title=TITLES[variant])
    axes[0].set_ylabel("density")
    axes[1].legend(fontsize=8, loc="upper left")
    return fig


def plausibility_figure(per_atom: pd.DataFrame, plaus: pd.DataFrame) -> plt.Figure:
    """Per-atom distance to the data, and recovery of classification directions."""
    colors = palette()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    shown = METHODS + ["nmf", "kmeans"]
    for ax, col, title in zip(
        axes[:2],
        ["nearest", "neg"],
        ["max cosine to a held-out data point", "negative mass share of the atom"],
        strict=True,
    ):
        data = [per_atom[per_atom.method == m][col].to_numpy() for m in shown]
        parts = ax.boxplot(data, showfliers=False, patch_artist=True)
        for patch, m in zip(parts["boxes"], shown, strict=True):
            patch.set_facecolor(colors[m])
        ax.set_xticks(range(1, len(shown) + 1), [LABELS[m] for m in shown], rotation=30)
        ax.set(title=title)
    probe = plaus.groupby("method")["probe"].agg(["mean", "std"]).reindex(shown)
    axes[2].bar(
        range(len(shown)), probe["mean"], yerr=probe["std"], color=[colors[m] for m in shown]
    )
    axes[2].set_xticks(range(len(shown)), [LABELS[m] for m in shown], rotation=30)
    axes[2].set(title="mean_c max_i cos(atom_i, probe direction w_c)")
    return fig


def matched_atoms_figure(
    dictionary: Any, codes_train: dict, img_train: torch.Tensor, pair: tuple, n_images: int
) -> plt.Figure | None:
    """For TopK and A-SAE, the most and the least stable matched pair of atoms of the runs in
    ``pair`` (among atoms firing on >= ``n_images`` training images in both runs), each atom shown
    by its top training images; None when no atom qualifies."""
    apply_style()
    a_key, b_key = pair
    picked_rows = []
    for method in ["topk", "archetypal"]:
        first, second = dictionary("seeds", method, a_key), dictionary("seeds", method, b_key)
        rows_, cols_, cos_ = matched_atoms(first, second)
        za, zb = codes_train[(method, a_key)], codes_train[(method, b_key)]
        fires_a = (za[:, rows_] > 0).sum(0) >= n_images
        fires = fires_a & ((zb[:, cols_] > 0).sum(0) >= n_images)
        ok = np.flatnonzero(fires.numpy())
        if len(ok) == 0:
            continue
        for kind, j in (("stable", ok[np.argmax(cos_[ok])]), ("unstable", ok[np.argmin(cos_[ok])])):
            picked_rows.append((method, kind, float(cos_[j]), "A", int(rows_[j]), za))
            picked_rows.append((method, kind, float(cos_[j]), "B", int(cols_[j]), zb))
    if not picked_rows:
        return None
    fig, axes = plt.subplots(
        len(picked_rows),
        n_images,
        figsize=(1.3 * n_images + 2, 1.35 * len(picked_rows)),
        squeeze=False,
    )
    for r, (method, kind, c, run, atom, z) in enumerate(picked_rows):
        idx = top_images(z, atom, n_images)
        for col in range(n_images):
            ax = axes[r, col]
            ax.axis("off")
            if col < len(idx):
                ax.imshow(img_train[idx[col]].numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].text(
            -0.15,
            0.5,
            f"{LABELS[method]} {kind}\nrun {run}, atom {atom}"
            + (f"\ncos = {c:.2f}" if run == "A" else ""),
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle(f"top training images of matched atoms, seed {a_key} (A) vs seed {b_key} (B)")
    fig.subplots_adjust(top=0.94, hspace=0.08, wspace=0.05)
    return fig
