"""Paper 45's figure: absorption against width (fixed k) and against k (fixed width)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from common.plots import apply_style


def sweeps_figure(
    table: pd.DataFrame, width_runs: list[str], k_runs: list[str], title: str
) -> plt.Figure:
    """Rows: absorption fraction, full-absorption rate; columns: the width sweep (``width_runs``,
    one k) and the k sweep (``k_runs``, one width); one line per seed, their mean, and the mean
    of the random-direction null (dotted)."""
    apply_style()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    width_k = int(table[table.run == width_runs[0]].k.iloc[0])
    k_width = int(table[table.run == k_runs[0]].d_sae.iloc[0])
    sweeps = [
        ("d_sae", table.run.isin(width_runs), f"width (d_sae), k = {width_k}"),
        ("k", table.run.isin(k_runs), f"k = L0, width = {k_width}"),
    ]
    for row, score in enumerate(("absorption_fraction", "absorption_full_rate")):
        for col, (axis, mask, label) in enumerate(sweeps):
            ax = axes[row, col]
            part = table[mask].sort_values(axis)
            for seed, group in part.groupby("seed"):
                ax.plot(group[axis], group[score], marker="o", alpha=0.5, label=f"seed {seed}")
            mean = part.groupby(axis)[score].mean()
            ax.plot(mean.index, mean.values, color="k", lw=2, label="mean")
            null = part.groupby(axis)[f"null_{score}"].mean()
            ax.plot(null.index, null.values, color="k", ls=":", label="null (random directions)")
            ax.set_xscale("log", base=2)
            ax.set_xticks(mean.index, [str(int(v)) for v in mean.index])
            ax.minorticks_off()
            ax.set_xlabel(label)
            ax.set_ylabel(score.replace("_", " "))
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
