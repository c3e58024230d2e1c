"""Paper 07's figure: frontier, dead latents and width scaling, one line per seed."""

from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from common.plots import apply_style


def topk_figure(runs: pd.DataFrame, p: Any, plain: str, title: str) -> plt.Figure:
    """Three panels: FVU vs L0 (TopK and ReLU + L1 at width ``p.d_sae``), the dead fraction with
    and without tied init + AuxK, and FVU vs width at ``k = p.width_k``."""
    apply_style()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for seed, s in runs.groupby("seed"):
        first = seed == runs.seed.min()
        relu = s[s.family == "relu"].sort_values("l0")
        topk = s[(s.family == "topk") & (s.d_sae == p.d_sae) & s.k.isin(p.topk_k)].sort_values("l0")
        axes[0].plot(
            relu.l0, relu.fvu, "o-", color="C0", alpha=0.7, label="ReLU + L1" if first else None
        )
        axes[0].plot(
            topk.l0, topk.fvu, "s-", color="C1", alpha=0.7, label="TopK" if first else None
        )
        width = s[s.run.isin([f"topk_k{p.width_k}_w{w}" for w in p.widths])].sort_values("d_sae")
        axes[2].plot(width.d_sae, width.fvu, "o-", color="C1", alpha=0.7)
    axes[0].set(xscale="log", xlabel="L0 (active latents per token)", ylabel="FVU")
    axes[0].set_title(f"frontier, {p.d_sae} latents")
    axes[0].legend()
    dead = runs[runs.run.isin([f"topk_k{p.width_k}_w{p.widths[-1]}", plain])].copy()
    dead["setting"] = np.where(dead.run == plain, "random init,\nno AuxK", "tied init\n+ AuxK")
    stats = dead.groupby("setting")["dead_fraction"].agg(["mean", "std"])
    stats.plot.bar(y="mean", yerr="std", ax=axes[1], legend=False, rot=0, color="C2")
    axes[1].set(ylabel="dead fraction (held-out tokens)", xlabel="")
    axes[1].set_title(f"dead latents, {p.widths[-1]} latents, k={p.width_k}")
    axes[2].set(xscale="log", xlabel="latents n", ylabel="FVU", title=f"width at k={p.width_k}")
    for ax in (axes[0], axes[2]):  # log-x axes labelled in plain numbers
        ax.xaxis.set_major_locator(LogLocator(base=2))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[2].set_xticks(p.widths)
    fig.suptitle(title)
    return fig
