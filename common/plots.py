"""One figure style for the whole repo, and the plots more than one paper draws."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless by default; JupyterLab's inline backend still takes over there
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

PALETTE = "colorblind"


def apply_style() -> None:
    """Seaborn's whitegrid with the colourblind palette, sized for a README."""
    sns.set_theme(style="whitegrid", palette=PALETTE, context="notebook")
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight"})


def savefig(fig: Figure, path: str | Path) -> Path:
    """Save as PNG (creating folders); figures are pipeline outputs shown in the READMEs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def frontier_plot(
    df: pd.DataFrame,
    x: str = "l0",
    y: str = "fvu",
    hue: str = "run",
    *,
    title: str = "",
    logy: bool = True,
    logx: bool = True,
) -> Figure:
    """Sparsity-fidelity frontier: one labelled point per SAE (a line where a run has several)."""
    apply_style()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    data = df.sort_values(x)
    several = data[hue].duplicated().any()
    plot = sns.lineplot if several else sns.scatterplot
    plot(data=data, x=x, y=y, hue=hue, style=hue, markers=True, s=70, ax=ax, legend=several)
    if not several:
        for _, row in data.iterrows():
            ax.annotate(
                str(row[hue]),
                (row[x], row[y]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=9,
            )
    if logy:
        ax.set_yscale("log")
    if logx:  # L0 spans orders of magnitude across architectures
        ax.set_xscale("log")
    ax.set_xlabel({"l0": "L0 (active latents per token)"}.get(x, x))
    ax.set_ylabel({"fvu": "FVU (fraction of variance unexplained)"}.get(y, y))
    ax.set_title(title)
    return fig
