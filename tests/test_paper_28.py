"""Unit tests of papers/28_msae/msae.py (MSAE on CLIP embeddings) on hand-made inputs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.sae import build_sae

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("paper28_msae", ROOT / "papers/28_msae/msae.py")
msae = importlib.util.module_from_spec(_spec)
sys.modules["paper28_msae"] = msae
_spec.loader.exec_module(msae)


def test_embedding_stats_centres_scales_and_inverts():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(500, 16, generator=g) * 3 + 5
    stats = msae.embedding_stats(e)
    x = stats.apply(e)
    assert torch.allclose(x.mean(0), torch.zeros(16), atol=1e-4)
    assert x.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-5)  # sqrt(16)
    assert torch.allclose(stats.invert(x), e, atol=1e-4)
    with pytest.raises(ValueError, match="N >= 2"):
        msae.embedding_stats(e[:1])
    with pytest.raises(ValueError, match="identical"):
        msae.embedding_stats(torch.ones(4, 3))


def _msae(d_in=8, d_sae=16):
    sae = build_sae("msae", d_in=d_in, d_sae=d_sae, ks=[2, 4], seed=0)
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive: TopK keeps exactly k
    return sae


def test_encode_at_nested_topk_and_relu_inference():
    sae = _msae()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    z2, z4, z_all = msae.encode_at(sae, x, 2), msae.encode_at(sae, x, 4), msae.encode_at(sae, x)
    assert ((z2 > 0).sum(1) == 2).all() and ((z4 > 0).sum(1) == 4).all()
    assert ((z2 > 0) <= (z4 > 0)).all()  # TopK_2 inside TopK_4
    assert torch.allclose(z4[z2 > 0], z2[z2 > 0])  # same values on the shared latents
    assert torch.allclose(z_all, torch.relu(sae.pre_activations(x)).detach())
    with pytest.raises(ValueError, match="k must be"):
        msae.encode_at(sae, x, 17)


def test_fidelity_perfect_and_mean_reconstruction():
    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    z = torch.zeros(50, 10)
    z[:, :3] = 1.0
    perfect = msae.fidelity(x, x.clone(), z)
    assert perfect["fvu"] == pytest.approx(0.0, abs=1e-7)
    assert perfect["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["l0"] == 3.0
    assert msae.fidelity(x, x.mean(0).expand_as(x), z)["fvu"] == pytest.approx(1.0, rel=1e-5)


def test_at_matched_l0_interpolates_in_log_l0():
    points = {"a": ([1.0, 100.0], [1.0, 0.0]), "b": ([10.0, 1000.0], [2.0, 0.0])}
    out = msae.at_matched_l0(points)
    assert out["l0"] == pytest.approx(math.sqrt(10 * 100))  # overlap [10, 100]
    assert out["a"] == pytest.approx(1 - 0.75)  # log10 L0* = 1.5 on a's [0, 2] range
    assert out["b"] == pytest.approx(2 * (1 - 0.25))


def test_zero_shot_accuracy():
    w = torch.eye(3)
    e = torch.tensor([[5.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    assert msae.zero_shot_accuracy(e, w, torch.tensor([0, 1, 2, 2])) == 0.75


def test_label_entropy_and_top_image_stats():
    assert msae.label_entropy([0, 1, 2, 3]) == pytest.approx(math.log(4))
    assert msae.label_entropy([5, 5, 5]) == 0.0
    labels = torch.tensor([0, 0, 1, 1, 2])
    z = torch.tensor(
        [[3.0, 1.0, 0.0], [2.0, 2.0, 0.0], [0.0, 3.0, 1.0], [0.0, 4.0, 0.0], [1.0, 0.0, 0.0]]
    )
    stats = msae.top_image_stats(z, labels, 2)
    assert stats["n_fire"].tolist() == [3, 4, 1]
    assert stats["entropy"][0] == 0.0 and stats["majority"][0] == 0  # images 0, 1: class 0
    assert stats["entropy"][1] == 0.0 and stats["majority"][1] == 1  # images 3, 2: class 1
    assert np.isnan(stats["entropy"][2]) and stats["majority"][2] == -1  # fires on 1 image < 2
    assert stats["purity"][0] == 1.0


def test_rank_usage_counts_coarse_and_fine_uses():
    z = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 4.0, 5.0, 1.0]])
    coarse, fine = msae.rank_usage(z, k_small=1, k_large=3)
    assert coarse.tolist() == [1, 0, 1, 0]
    assert fine.tolist() == [0, 2, 1, 1]


def test_corpus_nouns_ranks_by_gloss_frequency():
    texts = [
        "shoe: footwear; a shoe for the foot",
        "foot: the lower part of the leg",
        "leg: a limb; leg and foot",
        "run: move fast",
        "New York: a city",
        "ox: an animal",
    ]
    labels = [
        "noun.artifact",
        "noun.body",
        "noun.body",
        "verb.motion",
        "noun.location",
        "noun.animal",
    ]
    assert msae.corpus_nouns(texts, labels, 3) == ["foot", "leg", "shoe"]  # 2, 1, 1 mentions
    words = msae.corpus_nouns(texts, labels, 10)
    assert "run" not in words and "ox" not in words  # a verb; shorter than 3 letters
    assert msae.build_vocabulary(["bag", "shoe"], words) == ["bag", "shoe", "foot", "leg"]


def test_name_latents_and_naming_accuracy():
    vocab = torch.eye(4)
    decoder = torch.tensor([[0.0, 2.0, 0, 0], [1.0, 0, 0, 0], [1.0, 1.0, 1.0, 1.0]])
    names, best = msae.name_latents(decoder, vocab, threshold=0.6)
    assert names.tolist() == [1, 0, -1]  # the third is equally close to all: cos 0.5 < 0.6
    assert best[0] == pytest.approx(1.0)
    assert msae.naming_accuracy(names, np.array([1, 0, 2])) == pytest.approx(2 / 3)
    truth = np.arange(20)
    assert msae.naming_accuracy(truth, truth) == 1.0
    assert msae.shuffled_naming_accuracy(truth, truth, n_perm=500) == pytest.approx(0.05, abs=0.02)


def test_neighbours_shared_concepts_and_steering():
    gallery = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.7, 0.7, 0]])
    idx, sims = msae.code_neighbours(torch.tensor([[1.0, 0.1, 0]]), gallery, 2)
    assert idx[0].tolist() == [0, 2] and sims[0, 0] > sims[0, 1]
    assert msae.shared_concepts(
        torch.tensor([1.0, 2.0, 0.0]), torch.tensor([3.0, 0.5, 4.0]), 3
    ) == [
        (0, 1.0),
        (1, 0.5),
    ]
    q = torch.tensor([[1.0, 0.0, 0.0]])
    steered = msae.steer(q, 1, 3.0, 2.0)
    assert steered.tolist() == [[1.0, 6.0, 0.0]] and q[0, 1] == 0.0  # the query is not modified
    idx, _ = msae.code_neighbours(steered, gallery, 1)
    assert idx[0].tolist() == [1]


def test_class_selective_latent():
    z = torch.tensor([[5.0, 1.0, 1.0], [4.0, 1.0, 0.0], [4.0, 0.0, 3.0], [5.0, 0.0, 3.0]])
    y = torch.tensor([0, 0, 1, 1])
    assert msae.class_selective_latent(z, y, 1) == 2
    assert msae.class_selective_latent(z, y, 0) == 1  # latent 0 is equal on both classes
    assert msae.class_selective_latent(z, y, 1, exclude=[2]) == 0
    with pytest.raises(ValueError, match="present"):
        msae.class_selective_latent(z, y, 5)


def test_identity_keeping_strength_reads_before_the_query_loses_its_class():
    grid = [0.0, 1.0, 2.0, 4.0, 8.0, 16.0]
    own = {0.0: 0.8, 1.0: 0.8, 2.0: 0.7, 4.0: 0.45, 8.0: 0.3, 16.0: 0.02}
    assert msae.identity_keeping_strength(own, grid) == 4.0  # 0.45 >= 0.4 > 0.3
    # the first crossing counts, even if the share comes back later
    own_back = {**own, 2.0: 0.1, 4.0: 0.6}
    assert msae.identity_keeping_strength(own_back, grid) == 1.0
    # a first push that already halves the query's class reads the unsteered point
    assert msae.identity_keeping_strength({0.0: 0.8, 4.0: 0.2}, [0.0, 4.0]) == 0.0
    with pytest.raises(ValueError, match="start at 0 and increase"):
        msae.identity_keeping_strength(own, [1.0, 2.0])
    with pytest.raises(ValueError, match="start at 0 and increase"):
        msae.identity_keeping_strength(own, [0.0, 4.0, 2.0])
