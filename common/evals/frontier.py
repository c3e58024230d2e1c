"""Sparsity-fidelity frontiers: compare SAE families at a matched L0, and fit power laws.

Papers compare SAE families on the frontier of a fidelity metric (FVU, loss recovered, ...)
against L0, each family swept over its sparsity knob (an L1 coefficient, k). The runs of two
families never sit at exactly the same L0, so we interpolate each family's frontier piecewise
linearly in log L0 (the frontiers of Rajamanoharan et al. 2024, Fig. 1, and Gao et al. 2024,
Fig. 2, are drawn on a log L0 axis):

    y(L0*) = y_i + (y_{i+1} - y_i) * (log L0* - log L0_i) / (log L0_{i+1} - log L0_i),
             for L0_i <= L0* <= L0_{i+1}    (points sorted by L0)

and evaluate every family at an L0* that all of them reach: by default the geometric midpoint of
the overlap of their L0 ranges, L0* = sqrt(max_f min L0_f * min_f max L0_f). No extrapolation.

A power law y = a * n^b (e.g. FVU against the number of latents at fixed k, Gao et al. Sec. 3)
is fitted by least squares on log y = log a + b log n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _sorted_points(l0: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    l0_arr, y_arr = np.asarray(l0, dtype=float), np.asarray(y, dtype=float)
    if l0_arr.shape != y_arr.shape or l0_arr.ndim != 1 or len(l0_arr) == 0:
        raise ValueError(f"need two equal-length 1-d sequences, got {l0_arr.shape}, {y_arr.shape}")
    if not np.all(l0_arr > 0):
        raise ValueError(f"L0 values must be positive to take logs, got {l0_arr.tolist()}")
    order = np.argsort(l0_arr, kind="stable")
    return l0_arr[order], y_arr[order]


def interpolate_log_l0(l0: Sequence[float], y: Sequence[float], at: float) -> float:
    """y at L0 = ``at``, interpolated linearly in log L0 between a frontier's points.

    Raises ``ValueError`` if ``at`` lies outside [min L0, max L0] (no extrapolation).
    """
    xs, ys = _sorted_points(l0, y)
    if not (at > 0 and xs[0] * (1 - 1e-9) <= at <= xs[-1] * (1 + 1e-9)):
        raise ValueError(f"L0 = {at} is outside this frontier's range [{xs[0]}, {xs[-1]}]")
    return float(np.interp(math.log(at), np.log(xs), ys))


def matched_l0(frontiers: Mapping[str, Sequence[float]]) -> float:
    """The geometric midpoint of the L0 range every frontier covers (``{family: L0 values}``).

    Raises ``ValueError`` if the ranges do not overlap.
    """
    if not frontiers:
        raise ValueError("need at least one frontier")
    low = max(min(v) for v in frontiers.values())
    high = min(max(v) for v in frontiers.values())
    if not (low > 0 and low <= high):
        ranges = {k: (min(v), max(v)) for k, v in frontiers.items()}
        raise ValueError(f"the frontiers' L0 ranges do not overlap: {ranges}")
    return math.sqrt(low * high)


def power_law_fit(n: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """(a, b) of y = a * n^b, least squares in log-log space; needs >= 2 distinct positive n."""
    n_arr, y_arr = np.asarray(n, dtype=float), np.asarray(y, dtype=float)
    if n_arr.shape != y_arr.shape or len(np.unique(n_arr)) < 2:
        raise ValueError("need at least two distinct n with one y each")
    if not (np.all(n_arr > 0) and np.all(y_arr > 0)):
        raise ValueError("power-law fit needs positive n and y")
    b, log_a = np.polyfit(np.log(n_arr), np.log(y_arr), 1)
    return float(math.exp(log_a)), float(b)
