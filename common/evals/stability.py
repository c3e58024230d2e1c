"""Stability of a dictionary across training runs (Archetypal SAE, Fel et al. 2025, paper 18).

Two runs give dictionaries D (n x d) and D' (n' x d). With unit-normalised rows,

    stability(D, D') = max_{P in Perm} (1/m) sum_i cos(D_i, D'_{P(i)}),    m = min(n, n')

i.e. the mean cosine after the best one-to-one matching of atoms (the Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``). 1 means both runs found the same atoms; two random
dictionaries in high dimension score near 0. When n != n' the larger one keeps its best m atoms.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def matched_cosines(first: Tensor, second: Tensor) -> Tensor:
    """Cosines of the atom pairs chosen by the optimal one-to-one matching: shape (min(n, n'),).

    Solves max_P sum_i cos(D_i, D'_{P(i)}) with the Hungarian algorithm on the cosine matrix.
    """
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise ValueError(
            f"stability needs two (n_atoms, d) dictionaries of the same d, got shapes "
            f"{tuple(first.shape)} and {tuple(second.shape)}"
        )
    a = first.detach().double()
    b = second.detach().double()
    a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (a @ b.t()).cpu()
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    return cos[torch.as_tensor(rows), torch.as_tensor(cols)].float()


def stability(first: Tensor, second: Tensor) -> float:
    """Mean Hungarian-matched cosine between two dictionaries (paper 18's stability score)."""
    return matched_cosines(first, second).mean().item()
