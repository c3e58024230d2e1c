"""Paper 01's figures: label purity and k-sparse probing per basis, and the SAE's FVU vs PCA."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from common.plots import apply_style

BASES = ("sae", "pca", "ica", "neuron", "random")


def purity_figure(
    table: pd.DataFrame, chance_purity: float, n_top_docs: int, probe_ks: list[int]
) -> plt.Figure:
    """Mean top-document purity (dashed: chance) and k-sparse probe AUC, per site and basis."""
    apply_style()
    panels = ["purity"] + [f"probe_auc_k{k}" for k in probe_ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, 4.2))
    for ax, column in zip(np.atleast_1d(axes), panels):
        sns.barplot(data=table, x="site", y=column, hue="basis", errorbar="sd", ax=ax, legend=False)
        if column == "purity":
            ax.axhline(chance_purity, color="k", ls="--", lw=1)
            ax.set_ylabel(f"label purity of top-{n_top_docs} documents")
            ax.set_title("top-document purity (dashed: chance)", fontsize=11)
        else:
            ax.set_ylim(0.5, 1.0)
            ax.set_ylabel("test AUC")
            ax.set_title(f"{column.split('_k')[1]}-sparse probe", fontsize=11)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in sns.color_palette(n_colors=5)]
    fig.legend(handles, list(BASES), loc="center right")
    fig.subplots_adjust(right=0.88)
    fig.suptitle("SmolLM2-135M: tied-SAE directions vs PCA / ICA / neurons / random")
    return fig


def purity_distribution_figure(
    purities: list[dict], chance_purity: float, n_top_docs: int
) -> plt.Figure:
    """The distribution of one direction's top-document purity, per site and basis."""
    apply_style()
    dist = pd.DataFrame(purities).dropna()
    fig, ax = plt.subplots(figsize=(11, 4))
    sns.boxplot(
        data=dist, x="site", y="purity", hue="basis", hue_order=list(BASES), ax=ax, fliersize=1
    )
    ax.axhline(chance_purity, color="k", ls="--", lw=1)
    ax.set_ylabel(f"purity of one direction's top-{n_top_docs} docs")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1, 1))
    return fig


def fvu_figure(recon: pd.DataFrame) -> plt.Figure:
    """The SAE's FVU against PCA keeping round(L0) components, per site (mean and sd over seeds)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    recon_long = recon.melt(
        id_vars=["site", "seed"], value_vars=["sae_fvu", "pca_fvu_at_l0"], var_name="code"
    )
    sns.barplot(data=recon_long, x="site", y="value", hue="code", errorbar="sd", ax=ax)
    ax.set_ylabel("FVU on evaluation tokens")
    ax.set_title("Tied SAE vs PCA with k = round(L0) components")
    return fig
