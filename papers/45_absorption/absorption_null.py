"""Paper 45's null for "absorption exists": the same metric along directions that carry no
first-letter information.

``random_direction_probe`` keeps the first-letter probe's words, its train/test split, its
predictions (so the same true positives are scored) and hence the same main latents of every
letter (they are chosen from the SAE codes and the labels only), and replaces each letter's probe
direction w_L by a random direction r_L of the same norm (seeded). The absorption fraction along
r_L is what the metric reports when nothing is there to absorb: chance alignment of the other
latents' decoder rows with the direction, and chance shares of <x, r_L>.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from common.evals.absorption import FirstLetterProbe


def random_direction_probe(probe: FirstLetterProbe, seed: int) -> FirstLetterProbe:
    """``probe`` with every letter's direction replaced by a random one of the same norm."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(probe.directions.shape)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    r *= np.linalg.norm(probe.directions, axis=1, keepdims=True)
    return dataclasses.replace(probe, directions=r)
