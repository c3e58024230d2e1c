"""Helpers of papers/18_archetypal (Archetypal SAE stability and plausibility) on known inputs."""

from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from common.evals.stability import matched_cosines
from common.train import TensorBatches, TrainConfig, train

FOLDER = Path(__file__).resolve().parent.parent / "papers" / "18_archetypal"


def _load():
    spec = importlib.util.spec_from_file_location(
        "archetypal_stability", FOLDER / "archetypal_stability.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


A = _load()


def test_cyclic_pairs() -> None:
    assert A.cyclic_pairs([0, 1, 2]) == [(0, 1), (1, 2), (2, 0)]
    assert A.cyclic_pairs([3, 7]) == [(3, 7)]
    with pytest.raises(ValueError, match="at least two"):
        A.cyclic_pairs([0])


def test_disjoint_halves() -> None:
    a, b = A.disjoint_halves(11, seed=0)
    assert len(a) == len(b) == 5
    assert not set(a.tolist()) & set(b.tolist())
    a2, _ = A.disjoint_halves(11, seed=0)
    assert torch.equal(a, a2)
    assert not torch.equal(a, A.disjoint_halves(11, seed=1)[0])
    with pytest.raises(ValueError):
        A.disjoint_halves(1, seed=0)


def test_matched_atoms_recovers_a_permutation_and_agrees_with_core() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(6, 20, generator=g)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    second = 2.5 * d[perm]  # scaled, permuted copy: every atom matches exactly
    rows, cols, cos = A.matched_atoms(d, second)
    assert rows.tolist() == list(range(6))
    assert [int(perm[c]) for c in cols] == list(range(6))
    assert cos == pytest.approx(1.0)
    other = torch.randn(6, 20, generator=g)
    _, _, cos2 = A.matched_atoms(d, other)
    assert sorted(cos2.tolist()) == pytest.approx(sorted(matched_cosines(d, other).tolist()))
    with pytest.raises(ValueError):
        A.matched_atoms(d, torch.randn(6, 19))


def test_remove_direction() -> None:
    u = torch.tensor([1.0, 1.0, 0.0])
    atoms = torch.tensor([[2.0, 2.0, 0.0], [1.0, 0.0, 3.0]])
    out = A.remove_direction(atoms, u)
    assert torch.allclose(out @ u, torch.zeros(2), atol=1e-6)
    assert torch.allclose(out[0], torch.zeros(3), atol=1e-6)
    assert torch.allclose(out[1], torch.tensor([0.5, -0.5, 3.0]))


def test_nearest_data_cosine_and_negative_mass() -> None:
    points = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    atoms = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    near = A.nearest_data_cosine(atoms, points)
    assert near.tolist() == pytest.approx([1.0, 0.0, 1 / math.sqrt(2)], abs=1e-6)
    neg = A.negative_mass(torch.tensor([[1.0, -1.0], [2.0, 0.0], [-1.0, -3.0]]))
    assert neg.tolist() == pytest.approx([0.5, 0.0, 1.0])


def test_cone_cosine() -> None:
    points = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    atoms = torch.tensor(
        [
            [2.0, 1.0, 0.0],  # a nonnegative mix: inside the cone
            [0.0, 0.0, 1.0],  # orthogonal to every point: projection 0
            [1.0, 1.0, 1.0],  # half in: cos = sqrt(2/3)
            [-1.0, 0.5, 0.0],  # outside: best is 0.5 e2, cos = 0.5 / sqrt(1.25)
        ]
    )
    cos = A.cone_cosine(atoms, points, iterations=500)
    expected = [1.0, 0.0, math.sqrt(2 / 3), 0.5 / math.sqrt(1.25)]
    assert cos.tolist() == pytest.approx(expected, abs=1e-4)


def test_ridge_directions_and_probe_plausibility() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    x = 0.05 * torch.randn(300, 5, generator=g)
    x[torch.arange(300), labels] += 1.0  # class c lights up coordinate c
    w = A.ridge_directions(x, labels, 3, alpha=1e-3)
    assert w.shape == (3, 5)
    assert w[:, :3].argmax(1).tolist() == [0, 1, 2]
    assert A.probe_plausibility(w.clone(), w) == pytest.approx(1.0)
    # A dictionary of the coordinate axes recovers each direction only partly.
    axes = torch.eye(5)
    assert 0.5 < A.probe_plausibility(axes, w) < 1.0


def test_reference_dictionaries() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 6, generator=g)
    d = A.data_point_dictionary(x, 5, seed=0)
    assert all(any(torch.equal(row, p) for p in x) for row in d)
    with pytest.raises(ValueError):
        A.data_point_dictionary(x, 41, seed=0)
    with pytest.raises(ValueError, match="nonnegative"):
        A.nmf_dictionary(x - 1, 3, seed=0)
    assert A.nmf_dictionary(x, 3, seed=0, max_iter=50).shape == (3, 6)
    centres = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    blobs = centres.repeat(20, 1) + 0.1 * torch.randn(40, 2, generator=g)
    found = A.kmeans_dictionary(blobs, 2, seed=0)
    found = found[found[:, 0].argsort()]
    assert torch.allclose(found, centres, atol=0.2)


def test_top_images_keeps_active_inputs_only() -> None:
    codes = torch.tensor([[0.0, 1.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    assert A.top_images(codes, 0, 3).tolist() == [1, 2]
    assert A.top_images(codes, 1, 2).tolist() == [0]


def test_train_with_init_matches_an_uninterrupted_run() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    cfg = TrainConfig(
        architecture="topk", sae={"d_sae": 16, "k": 2}, steps=6, batch_size=32, seed=3
    )
    sae, init = A.train_with_init(cfg, x, data_seed=3)
    with tempfile.TemporaryDirectory() as tmp:
        ref = train(cfg, TensorBatches(x, 32, 3), tmp, resume=False, progress=False)
    assert torch.allclose(sae.decoder_directions, ref.decoder_directions)
    assert init.shape == (16, 8)
    assert not torch.allclose(init, sae.decoder_directions)
    z, x_hat = A.codes_and_reconstruction(sae, x)
    assert z.shape == (256, 16) and x_hat.shape == x.shape
    assert ((z > 0).sum(1) <= 2).all()
