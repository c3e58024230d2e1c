"""Paper 07's figure: frontier, dead latents, width and k scaling, one line per seed."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from common.plots import apply_style


def topk_figure(runs: pd.DataFrame, p: Any, widest: str, title: str) -> plt.Figure:
    """Four panels: FVU vs L0 (``p.topk_runs`` and ``p.relu_runs``), the dead fraction of
    ``widest`` (tied init + AuxK) and of ``p.plain_run`` (neither), FVU vs width
    (``p.width_runs``) and FVU vs k (``p.topk_runs``)."""
    apply_style()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for seed, s in runs.groupby("seed"):
        first = seed == runs.seed.min()
        relu = s[s.run.isin(p.relu_runs)].sort_values("l0")
        topk = s[s.run.isin(p.topk_runs)].sort_values("l0")
        axes[0].plot(
            relu.l0, relu.fvu, "o-", color="C0", alpha=0.7, label="ReLU + L1" if first else None
        )
        axes[0].plot(
            topk.l0, topk.fvu, "s-", color="C1", alpha=0.7, label="TopK" if first else None
        )
        width = s[s.run.isin(p.width_runs)].sort_values("d_sae")
        axes[2].plot(width.d_sae, width.fvu, "o-", color="C1", alpha=0.7)
        by_k = s[s.run.isin(p.topk_runs)].sort_values("k")
        axes[3].plot(by_k.k, by_k.fvu, "o-", color="C1", alpha=0.7)
    main_width = int(runs[runs.run == p.topk_runs[0]].d_sae.iloc[0])
    axes[0].set(xscale="log", xlabel="L0 (active latents per token)", ylabel="FVU")
    axes[0].set_title(f"frontier, {main_width} latents")
    axes[0].legend()
    dead = runs[runs.run.isin([widest, p.plain_run])].copy()
    dead["setting"] = np.where(
        dead.run == p.plain_run, "random init,\nno AuxK", "tied init\n+ AuxK"
    )
    stats = dead.groupby("setting")["dead_fraction"].agg(["mean", "std"])
    stats.plot.bar(y="mean", yerr="std", ax=axes[1], legend=False, rot=0, color="C2")
    widest_row = runs[runs.run == widest].iloc[0]
    axes[1].set(ylabel="dead fraction (held-out tokens)", xlabel="")
    axes[1].set_title(f"dead latents, {int(widest_row.d_sae)} latents, k={int(widest_row.k)}")
    axes[2].set(xscale="log", xlabel="latents n", ylabel="FVU")
    axes[2].set_title(f"width at k={int(widest_row.k)}")
    axes[3].set(xscale="log", xlabel="k", ylabel="FVU")
    axes[3].set_title(f"k at {main_width} latents")
    for ax in (axes[0], axes[2], axes[3]):  # log-x axes labelled in plain numbers
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[2].set_xticks(sorted(runs[runs.run.isin(p.width_runs)].d_sae.unique()))
    fig.suptitle(title)
    return fig
