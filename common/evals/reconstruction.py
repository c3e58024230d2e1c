"""Reconstruction metrics. ``x``: activations (N x d); ``x_hat``: the SAE's reconstruction.

    MSE     = (1/N) sum_n ||x_n - x_hat_n||^2
    FVU     = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2      (variance about the mean)
    EV      = 1 - FVU                                                    (explained variance)
    cosine  = (1/N) sum_n cos(x_n, x_hat_n)
    gamma   = argmin_g sum_n ||x_hat_n / g - x_n||^2 = sum ||x_hat||^2 / sum <x_hat, x>   (paper 2)

gamma is the gated-SAE paper's relative reconstruction bias (Rajamanoharan et al., 2024, Sec. 5.2):
1 means unbiased, gamma < 1 means reconstructions are shrunk (an L1 penalty pulls activations
towards zero), gamma > 1 that they are too large.
"""

from __future__ import annotations

from torch import Tensor


def reconstruction_metrics(x: Tensor, x_hat: Tensor) -> dict[str, float]:
    err = (x - x_hat).pow(2).sum(-1)
    total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    cos = (x * x_hat).sum(-1) / (x.norm(dim=-1) * x_hat.norm(dim=-1)).clamp_min(1e-12)
    fvu = (err.sum() / total_variance).item()
    return {
        "mse": err.mean().item(),
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "cosine": cos.mean().item(),
        "shrinkage_gamma": relative_reconstruction_bias(x, x_hat),
    }


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """gamma = sum ||x_hat||^2 / sum <x_hat, x>: below 1 means shrinkage (paper 2, Sec. 5.2)."""
    return (x_hat.pow(2).sum() / (x_hat * x).sum().clamp_min(1e-12)).item()
