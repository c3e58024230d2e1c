"""Paper 37's figures: per-block intervention effects, transfer to 4 steps, intervention grids."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from torch import Tensor

from common.plots import apply_style


def _palette() -> list[str]:
    return plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _bars(
    ax: Any,
    eff: pd.DataFrame,
    order: list[str],
    kinds: list[str],
    column: str,
    title: str,
    ylabel: str,
) -> None:
    palette, width = _palette(), 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        g = eff[eff.kind == kind].groupby("block")[column].agg(["mean", "std"]).reindex(order)
        ax.bar(
            np.arange(len(order)) + (i - (len(kinds) - 1) / 2) * width,
            g["mean"],
            width,
            yerr=g["std"],
            label=kind.replace("_", " "),
            color=palette[i],
        )
    ax.set_xticks(range(len(order)), order)
    ax.set(title=title, ylabel=ylabel)
    ax.legend(fontsize=8)


def block_effects_figure(
    eff: pd.DataFrame,
    order: list[str],
    lowpass_cutoff: float,
    steer_multiplier: float,
    n_classes: int,
    n_seeds: int,
) -> plt.Figure:
    """Four panels per block: class flips, low-frequency change, high-frequency share of the
    changes that keep the class (turning features off), and the steering target rate."""
    apply_style()
    off = ["ablation", "random_ablation", "mean_ablation"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    _bars(
        axes[0],
        eff,
        order,
        off,
        "flip_rate",
        "class flips when turned off (composition: excess over random)",
        "class flip rate",
    )
    _bars(
        axes[1],
        eff,
        order,
        off,
        "rms_low",
        f"low-frequency change (|f| <= {lowpass_cutoff:g})",
        "RMS pixel change",
    )
    _bars(
        axes[2],
        eff,
        order,
        off,
        "high_share_kept",
        "detail: high-frequency share, class kept",
        "E_high / (E_low + E_high)",
    )
    _bars(
        axes[3],
        eff,
        order,
        ["steering", "random_steering"],
        "target_rate",
        f"turning on class-B features (alpha = {steer_multiplier:g})",
        "rate the classifier reads B",
    )
    axes[3].axhline(1 / n_classes, color="k", lw=1, ls="--")
    fig.suptitle(f"per-block effects during 1-step generation (mean ± std, {n_seeds} seeds)")
    return fig


def transfer_figure(
    transfer: pd.DataFrame,
    splice: pd.DataFrame,
    order: list[str],
    all_sae_acc: float,
    acc_all_mean_4: float,
    acc_1step: float,
    acc_4step: float,
) -> plt.Figure:
    """Left: FVU of the 1-step and 4-step SAEs on 4-step updates per timestep (dotted: mean
    ablation); right: accuracy with the 1-step SAE spliced into 4-step sampling, per block and
    all blocks at once, against mean ablation and the unedited model."""
    apply_style()
    palette = _palette()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    g = transfer.groupby(["block", "t"]).mean(numeric_only=True).reset_index()
    for i, b in enumerate(order):
        gb = g[g.block == b].sort_values("t", ascending=False)
        ax.plot(gb.t, gb.sae_1step, "o-", color=palette[i], label=f"{b}: 1-step SAE")
        ax.plot(gb.t, gb.sae_4step, "s--", color=palette[i], alpha=0.6, label=f"{b}: 4-step SAE")
        ax.plot(gb.t, gb.mean_ablation, ":", color=palette[i], alpha=0.6)
    ax.set(
        xlabel="timestep t of the 4-step run",
        ylabel="FVU on 4-step updates",
        yscale="log",
        title="transfer (dotted: mean ablation)",
    )
    ax.invert_xaxis()
    ax.legend(fontsize=7, ncol=2)
    ax = axes[1]
    sp = splice.groupby("block").mean(numeric_only=True).reindex(order)
    xs = np.arange(len(order))
    ax.bar(
        xs - 0.2,
        sp.acc_1step_sae_in_4step,
        0.4,
        label="1-step SAE spliced, 4 steps",
        color=palette[0],
    )
    ax.bar(
        xs + 0.2,
        sp.acc_mean_ablation_in_4step,
        0.4,
        label="mean ablation, 4 steps",
        color=palette[3],
    )
    ax.bar(len(order) - 0.2, all_sae_acc, 0.4, color=palette[0])
    ax.bar(len(order) + 0.2, acc_all_mean_4, 0.4, color=palette[3])
    ax.axhline(acc_4step, color="k", lw=1, label="unedited 4 steps")
    ax.axhline(acc_1step, color="k", lw=1, ls="--", label="unedited 1 step")
    ax.set_xticks(range(len(order) + 1), order + ["all"])
    ax.set(
        ylabel="classifier accuracy",
        ylim=(0, 1.05),
        title="splicing the 1-step SAE into 4-step sampling",
    )
    ax.legend(fontsize=7, loc="lower left")
    return fig


def grid_figure(
    rows: Sequence[Tensor],
    col_titles: Sequence[str],
    row_titles: Sequence[str],
    label: Callable[[Tensor], str],
    title: str,
) -> plt.Figure:
    """Images (grey or RGB) in rows; ``label(image)`` (the classifier's reading) under each."""
    apply_style()
    n_r, n_c = len(rows), len(col_titles)
    fig, axes = plt.subplots(n_r, n_c, figsize=(1.5 * n_c + 1, 1.55 * n_r), squeeze=False)
    for r, images in enumerate(rows):
        for c in range(n_c):
            ax = axes[r, c]
            pixels = images[c].permute(1, 2, 0).numpy()  # (S, S, C): grey or RGB
            ax.imshow(
                pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=1
            )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label(images[c : c + 1]), fontsize=7)
            if r == 0:
                ax.set_title(col_titles[c], fontsize=7)
        axes[r, 0].set_ylabel(row_titles[r], fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
