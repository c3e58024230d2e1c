"""Paper 45's figure: absorption against width (fixed k) and against k (fixed width)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from common.plots import apply_style


def sweeps_figure(
    table: pd.DataFrame, width_sweep_k: int, k_sweep_width: int, title: str
) -> plt.Figure:
    """Rows: absorption fraction, full-absorption rate; columns: the width sweep at k =
    ``width_sweep_k`` and the k sweep at width ``k_sweep_width``; one line per seed and the mean."""
    apply_style()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    sweeps = [
        ("d_sae", table.k == width_sweep_k, f"width (d_sae), k = {width_sweep_k}"),
        ("k", table.d_sae == k_sweep_width, f"k = L0, width = {k_sweep_width}"),
    ]
    for row, score in enumerate(("absorption_fraction", "absorption_full_rate")):
        for col, (axis, mask, label) in enumerate(sweeps):
            ax = axes[row, col]
            part = table[mask].sort_values(axis)
            for seed, group in part.groupby("seed"):
                ax.plot(group[axis], group[score], marker="o", alpha=0.5, label=f"seed {seed}")
            mean = part.groupby(axis)[score].mean()
            ax.plot(mean.index, mean.values, color="k", lw=2, label="mean")
            ax.set_xscale("log", base=2)
            ax.set_xticks(mean.index, [str(int(v)) for v in mean.index])
            ax.minorticks_off()
            ax.set_xlabel(label)
            ax.set_ylabel(score.replace("_", " "))
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
