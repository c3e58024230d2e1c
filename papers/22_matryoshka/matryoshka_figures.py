"""Paper 22's figure: toy absorption, LM absorption and FVU, Matryoshka vs BatchTopK."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from common.plots import apply_style


def absorption_figure(
    toy_table: pd.DataFrame, lm_table: pd.DataFrame, seeds: list[int]
) -> plt.Figure:
    """Five panels (toy absorption, LM absorption fraction, LM full-absorption rate, LM 1-sparse
    probe AUC, LM FVU): bars are the mean over seeds, dots the seeds."""
    apply_style()
    fig, axes = plt.subplots(1, 5, figsize=(18.5, 3.6))
    panels = [
        (toy_table, "absorption", "toy: absorption (known parents)"),
        (lm_table, "absorption_fraction", "LM: absorption fraction"),
        (lm_table, "absorption_full_rate", "LM: full-absorption rate"),
        (lm_table, "probe_sae_k1_auc", "LM: 1-sparse probe AUC"),
        (lm_table, "fvu", "LM: FVU (held-out tokens)"),
    ]
    for ax, (table, column, title) in zip(axes, panels):
        means = table.groupby("run")[column].mean()
        positions = np.arange(len(means))
        ax.bar(positions, means.fillna(0).values, color=["C0", "C1"], alpha=0.6)
        for i, run in enumerate(means.index):
            values = table.loc[table.run == run, column].dropna()  # NaN: no letter passed the probe
            ax.scatter(np.full(len(values), i), values, color="k", s=14, zorder=3)
        ax.set_xticks(positions, means.index)
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        f"Matryoshka vs BatchTopK, same width and k; bars: mean, dots: seeds {seeds}", y=1.02
    )
    fig.tight_layout()
    return fig
