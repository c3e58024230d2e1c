"""Sparsity metrics of a code ``z`` (N x d_sae).

L0              = (1/N) sum_n #{i : z_ni > 0}
firing freq f_i = (1/N) #{n : z_ni > 0}
dead fraction   = share of latents with f_i = 0 on the evaluation tokens
dense fraction  = share of latents with f_i > dense_threshold (0.1 by default; paper 48)
"""

from __future__ import annotations

import torch
from torch import Tensor


def firing_frequencies(z: Tensor) -> Tensor:
    return (z > 0).float().mean(0)


def sparsity_metrics(z: Tensor, dense_threshold: float = 0.1) -> dict[str, float]:
    freq = firing_frequencies(z)
    return {
        "l0": (z > 0).float().sum(-1).mean().item(),
        "l1": z.abs().sum(-1).mean().item(),
        "dead_fraction": (freq == 0).float().mean().item(),
        "dense_fraction": (freq > dense_threshold).float().mean().item(),
    }


def log_frequency_histogram(z: Tensor, bins: int = 40) -> dict[str, list[float]]:
    """Histogram of log10 firing frequency of the live latents (the usual SAE health plot)."""
    freq = firing_frequencies(z)
    live = torch.log10(freq[freq > 0])
    if live.numel() == 0:
        return {"edges": [], "counts": []}
    counts, edges = torch.histogram(live, bins=bins)
    return {"edges": edges.tolist(), "counts": counts.tolist()}
