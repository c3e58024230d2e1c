"""Sparsifying activation functions shared by several architectures.

    TopK(a)_i       = a_i if a_i is among the k largest entries of a, else 0    (Gao et al.)
    BatchTopK(A)_bi = A_bi if among the B*k largest entries of the batch, else 0 (Bussmann et al.)

Both are applied to ReLU'd pre-activations, so every kept value is >= 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the k largest ReLU'd pre-activations of each row (dense output)."""
    values, indices = torch.relu(pre).topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values)


def batch_topk_activation(pre: Tensor, k: int) -> Tensor:
    """Keep the ``batch * k`` largest ReLU'd pre-activations of the whole batch (dense output)."""
    acts = torch.relu(pre)
    flat = acts.flatten()
    n_keep = min(k * pre.shape[0], flat.numel())
    values, indices = flat.topk(n_keep, sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)
