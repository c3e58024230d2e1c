"""Paper 3 (SpLiCE): helpers of papers/03_splice/splice.py on inputs with known answers."""

import importlib.util
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("splice_03", ROOT / "papers/03_splice/splice.py")
splice = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = splice
_spec.loader.exec_module(splice)


def test_phrase_counts_skip_stop_words_and_count_documents():
    texts = ["The red coat and the red hat.", "A red coat!", "of the of the"]
    uni, bi = splice.phrase_counts(texts, {"the", "and", "a", "of"})
    assert uni["red"] == 2  # document frequency: twice in the first text counts once
    assert uni["coat"] == 2 and "the" not in uni
    assert bi["red coat"] == 2 and bi["red hat"] == 1
    assert "of the" not in bi and "coat and" not in bi
    uni_tf, _ = splice.phrase_counts(texts, {"the"}, document_frequency=False)
    assert uni_tf["red"] == 3


def test_class_name_exclusion_and_order():
    excl = splice.class_name_words(["ankle boot", "t-shirt"])
    assert {"boot", "boots", "ankle", "shirt", "shirts"} <= excl
    uni = Counter({"boots": 9, "sea": 5, "stone": 4})
    bi = Counter({"red boot": 3, "sea stone": 2})
    out = splice.top_phrases(uni, bi, 2, 2, exclude_words=excl, include=["ankle boot"])
    assert out == ["ankle boot", "sea", "stone", "sea stone"]


def test_dedupe_keeps_first_of_near_duplicates():
    e = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [0.7, 0.7]])
    assert splice.dedupe_by_cosine(e, 0.9).tolist() == [0, 2, 3]
    # a protected row is kept even if it duplicates an earlier one
    assert splice.dedupe_by_cosine(e, 0.9, protect=2).tolist() == [0, 1, 2, 3]


def test_fista_recovers_exact_sparse_code_and_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    c = F.normalize(torch.randn(60, 20, generator=g), dim=-1)
    w_true = torch.zeros(3, 60)
    w_true[0, [1, 7]] = torch.tensor([0.8, 0.5])
    w_true[1, [3]] = 1.0
    w_true[2, [10, 20, 30]] = torch.tensor([0.3, 0.3, 0.6])
    z = w_true @ c
    # lam = 0: nonnegative least squares fits the targets exactly
    w0, _ = splice.nonneg_lasso_fista(c, z, 0.0, n_iter=1000, tol=1e-10)
    assert (w0 >= 0).all()
    assert torch.allclose(w0 @ c, z, atol=1e-3)
    # lam > 0: FISTA and scikit-learn's coordinate descent give the same minimiser
    lam = 0.05
    w, _ = splice.nonneg_lasso_fista(c, z, lam, n_iter=1000, tol=1e-9)
    for i in range(3):
        ref = splice.nonneg_lasso_sklearn(c, z[i], lam)
        assert torch.allclose(w[i], ref, atol=2e-4), (i, (w[i] - ref).abs().max())
    # a penalty above max_k <c_k, z> zeroes every weight (the KKT condition of the lasso)
    big = float((z @ c.T).max()) + 1e-3
    w_big, _ = splice.nonneg_lasso_fista(c, z, big, n_iter=500)
    assert float(w_big.abs().max()) == 0.0


def test_splice_centring_and_reconstruction():
    g = torch.Generator().manual_seed(1)
    concepts = F.normalize(torch.randn(40, 16, generator=g) + 3.0, dim=-1)  # a narrow cone
    mu = torch.full((16,), 0.2)
    images = F.normalize(concepts[:5] - concepts.mean(0), dim=-1) + mu  # centred concepts + mu
    path = splice.splice(images, concepts, [0.5, 0.0], center=True, image_mean=mu, n_iter=3000)
    assert [r["lam"] for r in path] == [0.5, 0.0]  # largest first
    exact = path[-1]
    assert splice.cosine(exact["z_hat"], images) > 0.999  # lam = 0 reconstructs in CLIP space
    # lam = 0.5 is sparser than lam = 0
    assert splice.l0(path[0]["w"]) < splice.l0(exact["w"])
    with pytest.raises(ValueError, match="image_mean"):
        splice.splice(images, concepts, [0.1], center=True)


def test_zero_shot_profile_and_random_dictionary():
    weights = torch.eye(3)
    emb = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.0, 1.0, 0.0]])
    assert splice.zero_shot_accuracy(emb, weights, torch.tensor([0, 2, 0])) == pytest.approx(2 / 3)
    w = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    prof = splice.class_concept_profile(w, torch.tensor([0, 0, 1]), 3)
    assert torch.allclose(prof, torch.tensor([[2.0, 1.0], [0.0, 4.0], [0.0, 0.0]]))
    r1, r2 = splice.random_dictionary(5, 8, 0), splice.random_dictionary(5, 8, 0)
    assert torch.equal(r1, r2) and torch.allclose(r1.norm(dim=1), torch.ones(5))


def test_side_by_side_is_the_sum_of_one_sided_canvases():
    a = torch.randint(0, 255, (2, 4, 4), dtype=torch.uint8)
    b = torch.randint(0, 255, (2, 4, 4), dtype=torch.uint8)
    both = splice.side_by_side(a, b, a)
    assert both.shape == (2, 8, 8)
    assert torch.equal(both, splice.side_by_side(a, None, a) + splice.side_by_side(None, b, a))
    assert torch.equal(both[:, 2:6, :4], a) and torch.equal(both[:, 2:6, 4:], b)
    assert int(both[:, :2].sum()) == 0


def test_linearity_scores_on_an_exactly_linear_map():
    g = torch.Generator().manual_seed(2)
    ea = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    eb = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    composite = F.normalize(ea + eb, dim=-1)  # a perfectly linear encoder
    other = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    s = splice.linearity_scores(composite, ea, eb, other)
    assert s["avg"] == pytest.approx(1.0, abs=1e-6)
    assert s["single"] < s["avg"] and s["control"] < s["avg"]


def test_weight_shares_halves_for_an_average_and_zero_for_an_unrelated_image():
    w_a = torch.tensor([[3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    w_b = torch.tensor([[0.0, 0.0, 1.0, 4.0, 2.0, 0.0, 0.0]])
    w_c = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 1.0]])
    w_ab = (w_a + w_b) / 2  # the composite as the exact average of its parts
    s = splice.weight_shares(w_a, w_b, w_c, w_ab, n_top=3)
    assert float(s["share_a"]) == pytest.approx(0.5)  # concept 2 is b's too: left out
    assert float(s["share_b"]) == pytest.approx(0.5)
    assert float(s["unrelated"]) == pytest.approx(0.0)
    # a's exclusive top concepts skip b's top ones and only count positive weights
    mask = splice.exclusive_top(w_a, 3, splice.exclusive_top(w_b, 3))
    assert mask[0].nonzero().flatten().tolist() == [0, 1]
    # an image with no weight at all gives NaN, not a share
    empty = splice.weight_shares(torch.zeros(1, 7), w_b, w_c, w_ab, n_top=3)
    assert torch.isnan(empty["share_a"]).all()
