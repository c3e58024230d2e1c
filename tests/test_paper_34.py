"""Paper 34 (SAUCE) helpers on hand-built inputs whose answers are known."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.sae import build_sae

_PATH = Path(__file__).resolve().parent.parent / "papers" / "34_sauce" / "sauce.py"
_spec = importlib.util.spec_from_file_location("paper_34_sauce", _PATH)
sauce = importlib.util.module_from_spec(_spec)
sys.modules["paper_34_sauce"] = sauce
_spec.loader.exec_module(sauce)


def test_selection_score_matches_formula_and_ranks_concept_feature_first():
    # feature 0 fires only on the concept, feature 1 everywhere, feature 2 only off-concept
    z = torch.tensor(
        [[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 1.0, 1.0]],
    )
    positive = torch.tensor([True, True, False, False])
    s = sauce.selection_scores(z, positive, delta=0.0)
    # an explicit negative set: only row 3, mu_nc = (0, 1, 1), sum 2
    s3 = sauce.selection_scores(z, positive, torch.tensor([False, False, False, True]), 0.0)
    assert torch.allclose(s3, torch.tensor([2 / 3, 1 / 3 - 1 / 2, -1 / 2]))
    # mu_c = (2, 1, 0), sum 3; mu_nc = (0, 1, 2), sum 3
    expected = torch.tensor([2 / 3 - 0.0, 1 / 3 - 1 / 3, 0.0 - 2 / 3])
    assert torch.allclose(s, expected)
    assert sauce.top_features(s, 1).tolist() == [0]
    assert sauce.top_features(s, 3).tolist() == [0, 1, 2]


def test_selection_score_rejects_empty_sets():
    z = torch.ones(3, 2)
    with pytest.raises(ValueError, match="non-empty"):
        sauce.selection_scores(z, torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="overlap"):
        sauce.selection_scores(z, torch.tensor([True, False, False]), torch.tensor([True] * 3))
    with pytest.raises(ValueError, match="shape"):
        sauce.selection_scores(z, torch.tensor([True, False]))


def test_top_features_breaks_ties_by_index_and_checks_k():
    s = torch.tensor([0.5, 1.0, 1.0, 0.2])
    assert sauce.top_features(s, 2).tolist() == [1, 2]
    with pytest.raises(ValueError):
        sauce.top_features(s, 5)


def test_edit_with_error_term_is_identity_for_gamma_one_and_matches_full_decode():
    torch.manual_seed(0)
    sae = build_sae("relu", d_in=6, d_sae=12, input_scale=0.5)
    with torch.no_grad():
        sae.b_enc.fill_(0.3)  # make many latents fire
    x = torch.randn(5, 6)
    z = sauce.sae_codes(sae, x)
    assert (z > 0).any()
    feats = torch.tensor([0, 3, 7])
    # gamma = 1 leaves the activation unchanged with the error term kept
    assert torch.allclose(sauce.edited_activations(sae, x, z, feats, 1.0), x)
    # keep_error=False replaces x by decode(z'), computed the long way here
    z_edit = z.clone()
    z_edit[:, feats] *= -2.0
    full = sae.scale_out(sae.decode(z_edit))
    got = sauce.edited_activations(sae, x, z, feats, -2.0, keep_error=False)
    assert torch.allclose(got, full, atol=1e-5)
    # keep_error=True adds the error term x - x_hat back
    with_error = sauce.edited_activations(sae, x, z, feats, -2.0)
    assert torch.allclose(with_error, full + (x - sae.scale_out(sae.decode(z))), atol=1e-5)


def test_unlearning_scores_single_and_abstract_concepts():
    labels = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 2, 1, 0, 2, 2])
    s = sauce.unlearning_scores(pred, labels, [0])
    assert s["ua"] == pytest.approx(0.5)  # one of two class-0 images still called 0
    assert s["ira"] == pytest.approx(3 / 4)  # non-targets: 1, 0(wrong), 2, 2
    # abstract concept {0, 1}: an image of class 0 called 1 still counts as recognised
    pred2 = np.array([1, 2, 0, 2, 2, 0])
    s2 = sauce.unlearning_scores(pred2, labels, [0, 1])
    assert s2["ua"] == pytest.approx(0.5)
    assert s2["ira"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        sauce.unlearning_scores(pred, labels, [5])
    assert sauce.accuracy(pred, labels) == pytest.approx(4 / 6)


def test_random_features_and_top_activating():
    gen = torch.Generator().manual_seed(0)
    cands = torch.tensor([3, 5, 9, 11])
    r = sauce.random_features(cands, 3, gen)
    assert len(set(r.tolist())) == 3 and set(r.tolist()) <= {3, 5, 9, 11}
    with pytest.raises(ValueError):
        sauce.random_features(cands, 5, gen)
    z = torch.tensor([[0.0, 1.0], [3.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    assert sauce.top_activating(z, 0, 3).tolist() == [1, 2]  # the zero row is left out


def test_abstract_concepts_are_fashion_classes():
    for classes in sauce.ABSTRACT_CONCEPTS.values():
        assert len(classes) > 1 and all(0 <= c < 10 for c in classes)
    c = sauce.Concept("footwear", "fashion-mnist", sauce.ABSTRACT_CONCEPTS["footwear"])
    assert c.abstract and not sauce.Concept("bag", "fashion-mnist", (8,)).abstract


def test_affine_readouts_match_sklearn_probe_and_edits():
    torch.manual_seed(1)
    x = torch.randn(60, 6) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0, 1.0]) + 2.0
    y = (x[:, 0] > 2.0).long() + (x[:, 3] > 2.0).long()  # 3 classes
    clf = sauce.fit_probe(x, y, c=1.0)
    head = sauce.probe_readout(clf)
    assert (head.predict(x) == clf.predict(x.numpy())).all()
    assert torch.allclose(
        head.scores(x),
        torch.as_tensor(clf.decision_function(x.numpy()), dtype=torch.float32),
        atol=1e-4,
    )
    sae = build_sae("relu", d_in=6, d_sae=10, input_scale=0.7)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)
    z = sauce.sae_codes(sae, x)
    feats = torch.tensor([1, 4])
    direct = clf.predict(sauce.edited_activations(sae, x, z, feats, -3.0).numpy())
    fast = sauce.edited_predictions(head.scores(x), z, head.feature_scores(sae), feats, -3.0)
    assert (direct == fast).mean() > 0.98  # equal up to float ties


class _ToyClip(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.image_proj = torch.nn.Linear(6, 4, bias=False)
        self.register_buffer("image_mean", torch.arange(6.0))
        self.register_buffer("image_std", torch.linspace(0.5, 2.0, 6))

    def project_image_features(self, x):
        return torch.nn.functional.normalize(
            self.image_proj((x - self.image_mean) / self.image_std), dim=-1
        )


def test_zero_shot_readout_has_the_same_argmax():
    torch.manual_seed(2)
    clip = _ToyClip()
    weights = torch.nn.functional.normalize(torch.randn(5, 4), dim=-1)
    x = torch.randn(40, 6) * 3
    head = sauce.zero_shot_readout(clip, weights)
    assert (head.predict(x) == sauce.zero_shot_predict(clip, x, weights)).all()


def test_multi_unlearning_scores_count_each_concept_on_its_own():
    labels = np.array([0, 0, 1, 1, 2, 2])
    # class 0 images called class 1 (forgotten as 0), class 1 kept, class 2 all right
    pred = np.array([1, 1, 1, 1, 2, 2])
    s = sauce.multi_unlearning_scores(pred, labels, (0, 1))
    assert s["ua"] == pytest.approx(0.5)  # class 0: 1, class 1: 0
    assert s["ira"] == pytest.approx(1.0)
    # the union reading would call class 0 still recognised (predicted in the set)
    assert sauce.unlearning_scores(pred, labels, (0, 1))["ua"] == pytest.approx(0.0)
    assert sauce.unlearning_quality(1.0, 0.5, 0.0) == pytest.approx(0.5)


def test_finetune_probe_unlearns_the_forget_set_and_stops():
    torch.manual_seed(3)
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]])
    y = torch.arange(3).repeat_interleave(40)
    x = centres[y] + 0.5 * torch.randn(120, 2)
    clf = sauce.fit_probe(x, y, c=1.0)
    forget = y == 0
    for beta in (0.0, 1.0):
        head, steps = sauce.finetune_probe(
            clf, x[forget], y[forget], x[~forget], y[~forget], (0,),
            retain_weight=beta, lr=0.05, max_steps=500, stop_ua=0.9,
        )  # fmt: skip
        pred = head.predict(x)
        assert 0 < steps < 500  # stopped by the rule, not by the step limit
        assert (pred[forget.numpy()] != 0).mean() >= 0.9
        if beta:  # gradient difference keeps the other classes
            assert (pred[~forget.numpy()] == y[~forget].numpy()).mean() > 0.9
    # no steps at all when the forget set is already unrecognised
    _, steps = sauce.finetune_probe(
        clf, x[forget], y[forget], x[~forget], y[~forget], (2,),
        retain_weight=0.0, lr=0.05, max_steps=5, stop_ua=0.9,
    )  # fmt: skip
    assert steps == 0
