"""Recovery of known features on toy data.

    MMCS = (1/F) sum_j max_i cos(f_j, d_i)        (mean max cosine similarity, Sharkey et al. 2022)
    recovered@0.9 = (1/F) #{j : max_i cos(f_j, d_i) > 0.9}

``f_j`` are the true features, ``d_i`` the SAE's decoder directions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def max_cosines(true_features: Tensor, directions: Tensor) -> Tensor:
    """For each true feature, the best cosine with any learned direction: shape (n_features,)."""
    f = true_features / true_features.norm(dim=1, keepdim=True).clamp_min(1e-12)
    d = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (f @ d.t()).max(dim=1).values


def recovery_metrics(
    true_features: Tensor, directions: Tensor, threshold: float = 0.9
) -> dict[str, float]:
    cos = max_cosines(true_features.detach().float(), directions.detach().float())
    return {
        "mmcs": cos.mean().item(),
        f"recovered_{threshold:g}": (cos > threshold).float().mean().item(),
    }


def random_dictionary_baseline(
    true_features: Tensor, d_sae: int, seed: int = 0
) -> dict[str, float]:
    """The same metrics for a random dictionary of the same size: the floor to beat.

    The generator is offset from ``seed`` so that it never replays the stream that drew the toy
    features themselves (with equal seeds the "random" dictionary would contain them exactly).
    """
    g = torch.Generator().manual_seed(seed + 7_919_113)
    return recovery_metrics(true_features, torch.randn(d_sae, true_features.shape[1], generator=g))
