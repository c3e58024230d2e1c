"""Paper 02's figure: gated vs ReLU frontiers (FVU, shrinkage, CE loss recovered vs L0)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from common.plots import apply_style


def frontier_figure(runs: pd.DataFrame, seeds: list[int], title: str) -> plt.Figure:
    """One panel per metric (FVU, gamma, and CE loss recovered when measured) against L0, one
    line per family and seed."""
    apply_style()
    panels = [("fvu", "FVU"), ("shrinkage_gamma", "shrinkage $\\gamma$")]
    if "ce_loss_recovered" in runs:
        panels.append(("ce_loss_recovered", "CE loss recovered"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4))
    for ax, (metric, label) in zip(np.atleast_1d(axes), panels, strict=True):
        for family, colour in (("relu", "C0"), ("gated", "C1")):
            for seed in seeds:
                g = runs[(runs.family == family) & (runs.seed == seed)].sort_values("l0")
                ax.plot(
                    g["l0"],
                    g[metric],
                    "o-",
                    color=colour,
                    alpha=0.7,
                    label=family if seed == seeds[0] else None,
                )
        if metric == "shrinkage_gamma":
            ax.axhline(1.0, color="grey", lw=1, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=2))  # L0 = 2, 4, 8, ... as plain numbers
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(title)
    return fig
