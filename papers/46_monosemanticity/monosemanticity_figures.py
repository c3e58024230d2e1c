"""Paper 46's figures: the distributions of MS (the authors' score) and of the formula as printed,
the width and sparsity sweeps, robustness across embedders and the top images of the highest- and
lowest-MS latents."""

from __future__ import annotations

import math
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.ticker import NullLocator
from monosemanticity import summarise, top_images

from common.plots import apply_style


def ms_distributions_figure(groups: dict, sbar: float, title: str) -> plt.Figure:
    """Histograms of log10 MS_printed and of MS per group of units (``groups``: name ->
    ``unit_scores`` dict with ``ms`` and ``ms_printed``)."""
    apply_style()
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for i, (name, scores) in enumerate(groups.items()):
        printed, ms = scores["ms_printed"], scores["ms"]
        printed, ms = printed[torch.isfinite(printed)].numpy(), ms[torch.isfinite(ms)].numpy()
        log_printed = np.log10(np.clip(printed, 1e-8, None))
        style = dict(density=True, histtype="step", lw=1.6, color=palette[i], label=name)
        axes[0].hist(log_printed, bins=50, **style)
        axes[1].hist(ms, bins=50, **style)
    axes[0].set(
        xlabel="log10 MS as printed, 1/(N(N-1)) sum r s (0 shown at -8)",
        ylabel="density",
        title="the printed formula: dominated by how many images a unit fires on",
    )
    axes[1].axvline(sbar, color="k", ls="--", lw=1, label="mean similarity s-bar")
    axes[1].set(xlabel="MS = sum r s / sum r (the authors' code)", title="MS per unit")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    return fig


def ms_vs_width_and_k_figure(
    sae_table: pd.DataFrame, neurons: tuple, sbar: float, p: Any, d_in: int
) -> plt.Figure:
    """Median MS (top) and MS_printed (bottom) of the sweep SAEs against width at ``p.k`` (left)
    and against k at ``p.expansion`` (right), mean and std over seeds, with the neurons' medians
    (``neurons``: a ``unit_scores`` dict)."""
    apply_style()
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex="col")
    for col, (sweep, var) in enumerate((("width", "expansion"), ("sparsity", "k"))):
        t = sae_table[sae_table.sweep == "sweep"]
        if var == "k":
            t = t[(t.expansion == p.expansion) & t.k.isin(p.ks)]
        else:
            t = t[(t.k == p.k) & t.expansion.isin(p.expansions)]
        g = t.groupby(var)[["ms_median", "ms_printed_median"]].agg(["mean", "std"])
        for row, (score, metric) in enumerate(
            (("ms", "ms_median"), ("ms_printed", "ms_printed_median"))
        ):
            ax = axes[row, col]
            ax.errorbar(
                g.index,
                g[(metric, "mean")],
                yerr=g[(metric, "std")].fillna(0),
                marker="o",
                color=palette[row],
                label=f"SAE latents ({p.sweep_architecture})",
            )
            base = summarise(neurons[score])["median"]
            ax.axhline(base, color="grey", ls=":", label="neurons (e_I)")
            if row == 0:
                ax.axhline(sbar, color="k", ls="--", lw=1, label="s-bar (shuffled)")
            ax.set(xscale="log", ylabel=("median MS" if row == 0 else "median MS as printed"))
            if row == 1:
                xlabel = f"expansion (d_sae / {d_in})" if var == "expansion" else "k"
                ax.set(yscale="log", xlabel=xlabel)
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(sorted(t[var].unique()), [str(v) for v in sorted(t[var].unique())])
            ax.legend(fontsize=8)
    axes[0, 0].set_title(f"width sweep at k = {p.k}")
    axes[0, 1].set_title(f"sparsity sweep at expansion {p.expansion}")
    return fig


def embedder_robustness_figure(robust: pd.DataFrame, sbar: dict[str, float]) -> plt.Figure:
    """Median MS minus each embedder's shuffle level, per kind of unit."""
    apply_style()
    fig, ax = plt.subplots(figsize=(7, 3.8))
    piv = robust.pivot(index="embedder", columns="units", values="MS median")
    piv = piv.sub(pd.Series(sbar), axis=0)  # relative to each embedder's shuffled level
    piv[[c for c in robust.units.unique()]].plot.bar(ax=ax, rot=0)
    ax.axhline(0, color="k", lw=1)
    ax.set(
        ylabel="median MS - s-bar",
        xlabel="embedder E",
        title="monosemanticity above the shuffle level, per embedder",
    )
    ax.legend(fontsize=8)
    return fig


def top_images_figure(
    z: torch.Tensor,
    w: torch.Tensor,
    eval_images: list[torch.Tensor],
    y_eval: torch.Tensor,
    label_names: list[str],
    p: Any,
) -> plt.Figure | None:
    """Top-activating held-out images of the ``p.n_grid_latents`` highest- and lowest-MS latents
    (``w``: their MS; among those firing on >= ``p.min_fires`` images); None when none qualifies."""
    apply_style()
    eligible = torch.isfinite(w) & ((z > 0).sum(0) >= p.min_fires)
    order = torch.argsort(torch.where(eligible, w, torch.full_like(w, -math.inf)), descending=True)
    n_ok = int(eligible.sum())
    picked = [("high", int(i)) for i in order[: min(p.n_grid_latents, n_ok)]]
    picked += [("low", int(i)) for i in order[max(0, n_ok - p.n_grid_latents) : n_ok].flip(0)]
    if not picked:
        return None
    shown = torch.cat(
        [
            torch.nn.functional.interpolate(
                im[:, None].float(), size=(28, 28), mode="bilinear", antialias=True
            )[:, 0]
            for im in eval_images
        ]
    )
    n_img = p.n_grid_images
    fig, axes = plt.subplots(
        len(picked), n_img, figsize=(1.3 * n_img, 1.45 * len(picked)), squeeze=False
    )
    for r, (kind, unit) in enumerate(picked):
        idx = top_images(z, unit, n_img)
        for c in range(n_img):
            ax = axes[r, c]
            ax.axis("off")
            if c < len(idx) and z[idx[c], unit] > 0:
                i = int(idx[c])
                ax.imshow(shown[i].numpy(), cmap="gray")
                ax.set_title(label_names[int(y_eval[i])].split("/")[1][:10], fontsize=7)
        axes[r, 0].text(
            -0.15,
            0.5,
            f"{kind}\n#{unit}\nMS {float(w[unit]):.3f}",
            transform=axes[r, 0].transAxes,
            ha="right",
            va="center",
            fontsize=8,
        )
    fig.suptitle("top images of the highest- (top rows) and lowest-MS latents")
    return fig
