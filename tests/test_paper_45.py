"""Unit tests of papers/45_absorption/absorption_null.py (the random-direction null)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch

from common.evals.absorption import absorption_from_activations, fit_first_letter_probe
from common.sae import build_sae

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "paper45_absorption_null", ROOT / "papers/45_absorption/absorption_null.py"
)
absorption_null = importlib.util.module_from_spec(_spec)
sys.modules["paper45_absorption_null"] = absorption_null
_spec.loader.exec_module(absorption_null)


def _letters_data(n_per_letter: int = 60, d: int = 24, seed: int = 0):
    """Words of four letters: each letter's activations point along its own direction."""
    g = torch.Generator().manual_seed(seed)
    letters = "abcd"
    directions = torch.randn(len(letters), d, generator=g)
    x = torch.cat([directions[i] * 3 + 0.3 * torch.randn(n_per_letter, d, generator=g)
                   for i in range(len(letters))])  # fmt: skip
    return x, [letter for letter in letters for _ in range(n_per_letter)]


def test_random_direction_probe_keeps_the_words_and_changes_only_the_directions():
    x, letters = _letters_data()
    probe = fit_first_letter_probe(x, letters, seed=0)
    null = absorption_null.random_direction_probe(probe, seed=1)
    assert np.array_equal(null.test, probe.test) and np.array_equal(null.predicted, probe.predicted)
    assert list(null.classes) == list(probe.classes) and null.accuracy == probe.accuracy
    assert np.allclose(np.linalg.norm(null.directions, axis=1),
                       np.linalg.norm(probe.directions, axis=1))  # fmt: skip
    cos = (null.directions * probe.directions).sum(1) / np.linalg.norm(
        probe.directions, axis=1
    ) ** 2
    assert np.all(np.abs(cos) < 0.9)  # not the probe's directions
    again = absorption_null.random_direction_probe(probe, seed=1)
    assert np.array_equal(again.directions, null.directions)  # seeded
    other = absorption_null.random_direction_probe(probe, seed=2)
    assert not np.array_equal(other.directions, null.directions)


def test_the_null_runs_through_the_absorption_metric():
    x, letters = _letters_data()
    probe = fit_first_letter_probe(x, letters, seed=0)
    sae = build_sae("topk", d_in=x.shape[1], d_sae=16, k=2)
    real = absorption_from_activations(sae, x, letters, probe=probe).metrics
    null = absorption_from_activations(
        sae, x, letters, probe=absorption_null.random_direction_probe(probe, seed=0)
    ).metrics
    assert real["absorption_n_letters"] == null["absorption_n_letters"]  # the same letters
    assert 0.0 <= null["absorption_fraction"] <= 1.0
