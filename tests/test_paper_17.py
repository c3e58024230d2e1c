"""Unit tests of papers/17_saeuron/saeuron.py on hand-built inputs with known answers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from common.sae import build_sae

_PATH = Path(__file__).resolve().parent.parent / "papers" / "17_saeuron" / "saeuron.py"
_spec = importlib.util.spec_from_file_location("saeuron", _PATH)
saeuron = importlib.util.module_from_spec(_spec)
sys.modules["saeuron"] = saeuron
_spec.loader.exec_module(saeuron)


def _stats() -> saeuron.ActivationStats:
    # 2 classes, 1 timestep (t=999), 3 features; sums over 2 tokens per class.
    sums = torch.tensor([[[2.0, 0.0, 2.0]], [[0.0, 2.0, 2.0]]])
    return saeuron.ActivationStats(torch.tensor([999]), sums, torch.full((2, 1), 2.0))


def _identity_sae(d: int = 3) -> torch.nn.Module:
    sae = build_sae("topk", d_in=d, d_sae=d, k=d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_means_and_concept_scores() -> None:
    st = _stats()
    assert torch.allclose(st.mean_class()[0, 0], torch.tensor([1.0, 0.0, 1.0]))
    assert torch.allclose(st.mean_rest()[0, 0], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.allclose(st.mean_all()[0], torch.tensor([0.5, 0.5, 1.0]))
    s = saeuron.concept_scores(st, delta=0.0)
    # class 0: shares (1/2, 0, 1/2) - (0, 1/2, 1/2) = (1/2, -1/2, 0)
    assert torch.allclose(s[0, 0], torch.tensor([0.5, -0.5, 0.0]))
    assert torch.allclose(s[1, 0], -s[0, 0])
    assert saeuron.select_features(s, 1)[:, 0, 0].tolist() == [0, 1]
    with pytest.raises(ValueError):
        saeuron.select_features(s, 4)


def test_unknown_timestep_is_an_error() -> None:
    with pytest.raises(KeyError, match="no statistics"):
        _stats().index(torch.tensor([999, 500]))


def test_edit_identity_and_flip() -> None:
    sae, st = _identity_sae(), _stats()
    feats = saeuron.select_features(saeuron.concept_scores(st), 1)  # class 0 -> feature 0
    x = torch.tensor([[2.0, 0.3, -1.0], [0.2, 1.0, 0.5]])
    t = torch.tensor([999, 999])
    none = saeuron.UnlearnEdit(sae, st, feats, [], -1.0, keep_error=True)
    assert torch.equal(none(x, t), x)  # no target + error term: unchanged
    inserted = saeuron.UnlearnEdit(sae, st, feats, [], -1.0, keep_error=False)
    assert torch.allclose(inserted(x, t), x.clamp_min(0))  # the SAE (a ReLU here) inserted
    edit = saeuron.UnlearnEdit(sae, st, feats, [0], -3.0, keep_error=True)
    out = edit(x, t)
    # token 0: f_0 = 2 > mu(0, t, D) = 0.5 -> 2 * (-3 * mu(0, t, D_0) = -3) = -6; token 1 kept.
    assert torch.allclose(out[0], torch.tensor([-6.0, 0.3, -1.0]))
    assert torch.allclose(out[1], x[1])
    assert edit.edited_fraction == [0.5]
    with pytest.raises(ValueError, match="negative"):
        saeuron.UnlearnEdit(sae, st, feats, [0], 1.0)


def test_frechet_distance_known_values() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 3, generator=g)
    assert saeuron.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    shift = torch.tensor([1.0, 2.0, 2.0])
    assert saeuron.frechet_distance(a, a + shift) == pytest.approx(9.0, abs=1e-3)


def test_unlearning_summary_and_groups() -> None:
    rates = torch.tensor([0.25, 1.0, 0.5, 1.0])
    base = torch.tensor([1.0, 1.0, 1.0, 0.5])
    s = saeuron.unlearning_summary(rates, base, [0])
    assert s["unlearning_accuracy"] == pytest.approx(0.75)
    assert s["retention"] == pytest.approx(2.5 / 3)
    assert s["retention_vs_baseline"] == pytest.approx((2.5 / 3) / (2.5 / 3))
    with pytest.raises(ValueError):
        saeuron.unlearning_summary(rates, base, [])
    pred = torch.tensor([0, 1, 1, 1])
    assert saeuron.class_rates(pred, torch.tensor([0, 0, 1, 1]), 2).tolist() == [0.5, 1.0]
    names = ["t-shirt", "trouser", "sandal", "sneaker"]
    groups = saeuron.parse_groups(["sandal, sneaker"], names)
    assert groups == [[2, 3]]
    assert saeuron.similar_and_dissimilar(3, groups, 4) == ([2], [0, 1])
    with pytest.raises(ValueError, match="unknown class"):
        saeuron.parse_groups(["boot"], names)


def test_random_features_shape_and_distinct() -> None:
    r = saeuron.random_features((2, 3, 4), 10, seed=0)
    assert r.shape == (2, 3, 4)
    assert all(len(set(r[c, t].tolist())) == 4 for c in range(2) for t in range(3))
    assert torch.equal(r, saeuron.random_features((2, 3, 4), 10, seed=0))
