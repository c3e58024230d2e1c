"""Paper 46 (Pach et al., MonoSemanticity score): the folder helpers on hand-made inputs."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from common.hooks import Site

ROOT = Path(__file__).resolve().parent.parent
_PATH = ROOT / "papers" / "46_monosemanticity" / "monosemanticity.py"
_spec = importlib.util.spec_from_file_location("monosemanticity_46", _PATH)
ms46 = importlib.util.module_from_spec(_spec)
sys.modules["monosemanticity_46"] = ms46
_spec.loader.exec_module(ms46)


def naive_ms(acts: torch.Tensor, sim: torch.Tensor) -> list[float]:
    """The paper's double loop: MS^k = 1/(N(N-1)) sum_{n != m} a~_n a~_m s_nm."""
    n, k = acts.shape
    out = []
    for j in range(k):
        col = acts[:, j].double()
        lo, hi = float(col.min()), float(col.max())
        if hi == lo:
            out.append(math.nan)
            continue
        a = [(float(v) - lo) / (hi - lo) for v in col]
        total = 0.0
        for p in range(n):
            for q in range(n):
                if p != q:
                    total += a[p] * a[q] * float(sim[p, q])
        out.append(total / (n * (n - 1)))
    return out


@pytest.fixture
def random_case():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(9, 5, generator=g)  # signed, like raw neurons
    acts[:, 1] = torch.relu(acts[:, 1])  # a ReLU unit
    acts[:, 3] = 2.5  # a dead (constant) unit
    emb = torch.randn(9, 4, generator=g)
    return acts, emb


def test_matrix_forms_match_double_loop(random_case):
    acts, emb = random_case
    sim = ms46.cosine_similarity_matrix(emb)
    expected = torch.tensor(naive_ms(acts, sim), dtype=torch.float32)
    dense = ms46.ms_scores(acts, sim, batch_size=2)  # several unit batches
    low_rank = ms46.ms_scores_embedded(acts, emb, batch_size=3)
    for got in (dense, low_rank):
        assert torch.isnan(got[3]) and torch.isnan(expected[3])
        ok = ~torch.isnan(expected)
        torch.testing.assert_close(got[ok], expected[ok], atol=1e-5, rtol=1e-4)


def test_dense_form_with_nonunit_diagonal():
    # a general similarity (not a cosine): the diagonal must still be excluded
    g = torch.Generator().manual_seed(1)
    acts = torch.rand(6, 3, generator=g)
    sim = torch.rand(6, 6, generator=g) + 5 * torch.eye(6)
    torch.testing.assert_close(
        ms46.ms_scores(acts, sim), torch.tensor(naive_ms(acts, sim), dtype=torch.float32)
    )


def test_known_values():
    # two groups of identical images; unit 0 fires on group A only, unit 1 on everything
    emb = torch.tensor([[1.0, 0.0]] * 3 + [[0.0, 1.0]] * 3)
    acts = torch.tensor([[1.0, 1.0]] * 3 + [[0.0, 1.0]] * 3)
    acts[0, 1] = 0.0  # unit 1 is not constant: a~ = 0 on image 0, 1 elsewhere
    ms = ms46.ms_scores_embedded(acts, emb)
    # unit 0: pairs within group A (3 * 2 ordered) with s = 1, over N(N-1) = 30
    assert float(ms[0]) == pytest.approx(6 / 30)
    # unit 1: images 1..5 active; same-group ordered pairs: {1,2} -> 2, {3,4,5} -> 6
    assert float(ms[1]) == pytest.approx(8 / 30)
    w = ms46.weighted_ms(ms, acts)
    assert float(w[0]) == pytest.approx(1.0)  # all its weight on identical images
    assert float(w[1]) == pytest.approx(8 / 20)  # 5 * 4 weighted pairs, 8 of them alike


def test_minmax_handles_sign_and_dead_units():
    acts = torch.tensor([[-2.0, 3.0], [0.0, 3.0], [2.0, 3.0]])
    a, alive = ms46.minmax_normalise(acts)
    torch.testing.assert_close(a[:, 0], torch.tensor([0.0, 0.5, 1.0]))
    assert alive.tolist() == [True, False]
    assert torch.all(a[:, 1] == 0)
    # an affine change of a unit's activations (positive scale) leaves its MS unchanged
    emb = torch.randn(3, 2, generator=torch.Generator().manual_seed(2))
    ms1 = ms46.ms_scores_embedded(acts[:, :1], emb)
    ms2 = ms46.ms_scores_embedded(3 * acts[:, :1] + 7, emb)
    torch.testing.assert_close(ms1, ms2)


def test_shuffle_control_expectation():
    # averaged over many shuffles, MS -> rbar * sbar and wMS -> sbar
    g = torch.Generator().manual_seed(3)
    n = 40
    emb = torch.randn(n, 3, generator=g) + torch.tensor([1.0, 0.0, 0.0])
    acts = torch.relu(torch.randn(n, 1, generator=g))
    sbar = ms46.mean_offdiagonal(ms46.cosine_similarity_matrix(emb))
    rbar = float(ms46.mean_pair_weight(acts)[0])
    many = torch.cat([ms46.shuffle_columns(acts, s) for s in range(400)], dim=1)
    mean_ms = float(ms46.ms_scores_embedded(many, emb).mean())
    assert mean_ms == pytest.approx(rbar * sbar, rel=0.05)
    # and a shuffle keeps each column's values
    one = ms46.shuffle_columns(acts, 0)
    torch.testing.assert_close(one.sort(0).values, acts.sort(0).values)


def test_label_embedding_and_pixels():
    labels = torch.tensor([0, 1, 0, 2])
    sim = ms46.cosine_similarity_matrix(ms46.label_embedding(labels, 3))
    torch.testing.assert_close(sim, (labels[:, None] == labels[None]).float())
    imgs = [torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8), torch.zeros(2, 28, 28)]
    pix = ms46.pixel_embedding(imgs, size=14)
    assert pix.shape == (5, 196)
    torch.testing.assert_close(pix.mean(0), torch.zeros(196), atol=1e-6, rtol=0)


def test_block_embedding_stops_at_the_block():
    calls = []

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(1, 2, 1)
            self.b = torch.nn.Conv2d(2, 2, 1)

        def forward(self, x):
            h = self.a(x)
            calls.append("after a")
            return self.b(h)

    net = Net()
    images = torch.rand(5, 1, 3, 3)
    site = Site("a", net.a, "output", "spatial", 0)  # by hand: no named sites on this toy net
    out = ms46.block_embedding(net, site, net, lambda b: b, images, batch_size=2)
    torch.testing.assert_close(out, net.a(images).mean(dim=(2, 3)))
    assert calls == []  # the forward never got past block a


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2 images"):
        ms46.ms_scores(torch.ones(1, 3), torch.ones(1, 1))
    with pytest.raises(ValueError, match="similarity must be"):
        ms46.ms_scores(torch.rand(4, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="embeddings must be"):
        ms46.ms_scores_embedded(torch.rand(4, 2), torch.ones(3, 2))


def test_summarise_ignores_nan():
    s = ms46.summarise(torch.tensor([1.0, math.nan, 3.0, 2.0]))
    assert s["median"] == pytest.approx(2.0) and s["n"] == 3.0


def naive_authors_ms(acts: torch.Tensor, emb: torch.Tensor) -> list[float]:
    """The authors' metric.py: sum_{n<m} w s / sum_{n<m} w with w = a~_n a~_m (NaN if sum w = 0)."""
    u = torch.nn.functional.normalize(emb.double(), dim=1)
    sim = u @ u.T
    n, k = acts.shape
    out = []
    for j in range(k):
        col = acts[:, j].double()
        lo, hi = float(col.min()), float(col.max())
        if hi == lo:
            out.append(math.nan)
            continue
        a = (col - lo) / (hi - lo)
        num = sum(float(a[p] * a[q] * sim[p, q]) for p in range(n) for q in range(p + 1, n))
        den = sum(float(a[p] * a[q]) for p in range(n) for q in range(p + 1, n))
        out.append(num / den if den else math.nan)
    return out


def test_unit_scores_ms_is_the_authors_normalised_score(random_case):
    acts, emb = random_case
    scores = ms46.unit_scores(acts, emb)
    expected = torch.tensor(naive_authors_ms(acts, emb), dtype=torch.float32)
    ok = ~torch.isnan(expected)
    assert torch.isnan(scores["ms"][3])  # the dead unit
    torch.testing.assert_close(scores["ms"][ok], expected[ok], atol=1e-5, rtol=1e-4)
    printed = torch.tensor(naive_ms(acts, ms46.cosine_similarity_matrix(emb)), dtype=torch.float32)
    torch.testing.assert_close(scores["ms_printed"][ok], printed[ok], atol=1e-5, rtol=1e-4)


def test_group_rows_and_prefix_bounds():
    class Cfg:
        d_sae = 8

        def prefix_sizes(self):
            return [2, 8]

    class Plain:
        d_sae = 8

    assert ms46.prefix_bounds(Cfg()) == [0, 2, 8]
    assert ms46.prefix_bounds(Plain()) == [0, 8]
    z = torch.zeros(4, 8)
    z[:, 0] = 1.0  # latent 0 fires on every image, the rest never
    ms = torch.arange(8, dtype=torch.float32)
    rows = ms46.group_rows(0, [0, 2, 8], z, ms)
    assert [r["latents"] for r in rows] == ["0-2", "2-8"]
    assert rows[0]["firing_rate"] == pytest.approx(0.5) and rows[1]["firing_rate"] == 0.0
    assert rows[0]["ms_median"] == pytest.approx(0.5) and rows[1]["ms_median"] == pytest.approx(4.5)


def test_encode_eval_reports_fvu_and_l0():
    from common.sae import build_sae

    sae = build_sae("topk", d_in=6, d_sae=12, k=2, seed=0)
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(4))
    z, rec = ms46.encode_eval(sae, x)
    assert z.shape == (20, 12)
    assert rec["l0"] <= 2.0 and math.isfinite(rec["fvu"]) and rec["fvu"] >= 0
