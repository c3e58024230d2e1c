"""Paper 19's figures: the metric-by-architecture heat-map and proxy vs downstream scatters."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from saebench import spearman

from common.plots import apply_style

COLUMNS = (
    "fvu",
    "l0",
    "ce_loss_recovered",
    "dead_fraction",
    "probe_sae_k1_acc",
    "probe_raw_k1_acc",
    "probe_sae_k5_acc",
    "probe_raw_full_acc",
    "absorption_fraction",
)


def heatmap_figure(means: pd.DataFrame, n_seeds: int) -> plt.Figure:
    """Each metric's mean per architecture; colour = the column's rank, annotations = values."""
    apply_style()
    fig, ax = plt.subplots(figsize=(1.1 * means.shape[1] + 2, 0.45 * len(means) + 1.5))
    sns.heatmap(means.rank(pct=True), annot=means, fmt=".3g", cmap="viridis", cbar=False, ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.set_title(f"SAEBench-style metrics by architecture (mean of {n_seeds} seeds)")
    return fig


def proxy_vs_downstream_figure(
    long: pd.DataFrame, means: pd.DataFrame, derived: pd.DataFrame, archs: list[str]
) -> plt.Figure:
    """Each proxy (x) against each downstream metric (y), one point per (architecture, seed),
    titled with the Spearman rho of the seed means and the per-seed rho (mean +- sd)."""
    apply_style()
    pairs = [
        (p, d)
        for d in ("probe_sae_k1_acc", "absorption_fraction")
        for p in ("fvu", "ce_loss_recovered", "l0")
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    for ax, (p, d) in zip(axes.flat, pairs):
        sns.scatterplot(
            data=long, x=p, y=d, hue="arch", style="arch", ax=ax, s=45, legend=ax is axes.flat[0]
        )
        rho = spearman(means[p], means[d])
        per_seed = derived.loc[f"rho_{p}_vs_{d}"]
        ax.set_title(
            f"ρ(means) = {rho:.2f}; per seed {per_seed.mean():.2f} ± {per_seed.std():.2f}",
            fontsize=10,
        )
    if axes.flat[0].get_legend() is not None:
        sns.move_legend(axes.flat[0], "upper left", bbox_to_anchor=(0, -1.45), ncol=len(archs))
    fig.suptitle("Proxy metrics (x) vs downstream metrics (y), Spearman ρ across architectures")
    fig.tight_layout(h_pad=3.0)
    return fig
