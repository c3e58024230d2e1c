"""Reconstruction metrics. ``x``: activations (N x d); ``x_hat``: the SAE's reconstruction.

    MSE     = (1/N) sum_n ||x_n - x_hat_n||^2
    FVU     = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2      (variance about the mean)
    EV      = 1 - FVU                                                    (explained variance)
    cosine  = (1/N) sum_n cos(x_n, x_hat_n)
    shrinkage gamma = argmin_g sum_n ||g x_hat_n - x_n||^2 = <x_hat, x> / ||x_hat||^2   (paper 2)

The gated-SAE paper (Rajamanoharan et al., 2024) reports the relative reconstruction bias gamma,
computed with the roles of x and x_hat as above: gamma < 1 means reconstructions are too large,
gamma > 1 that they are shrunk (an L1 penalty pulls activations towards zero).
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
        "shrinkage_gamma": shrinkage_gamma(x, x_hat),
    }


def shrinkage_gamma(x: Tensor, x_hat: Tensor, b: Tensor | None = None) -> float:
    """gamma = argmin_g ||g (x_hat - b) - (x - b)||^2; b = 0 unless a centring bias is given."""
    if b is not None:
        x, x_hat = x - b, x_hat - b
    return ((x_hat * x).sum() / x_hat.pow(2).sum().clamp_min(1e-12)).item()
