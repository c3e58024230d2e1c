"""Switch (paper 9), Archetypal / RA (paper 18) and matching-pursuit (paper 41) SAEs.

Toy runs: 8k samples of the superposition toy (64 features in d=32, L0 ~ 3.2) or the correlated
toy (64 features in 16 groups, d=48), 400 steps of 256, cached per module.
"""

from __future__ import annotations

import tempfile
from functools import cache

import pytest
import torch

from common import toy
from common.evals.ground_truth import random_dictionary_baseline, recovery_metrics
from common.evals.stability import matched_cosines, stability
from common.sae import SAE, build_sae
from common.sae.archetypal import kmeans
from common.sae.base import fvu
from common.sae.mp import matching_pursuit, pursuit_indices
from common.train import TensorBatches, TrainConfig, train

BATCH, STEPS, D_SAE = 256, 400, 128
ARCHS = {
    "switch": dict(n_experts=2, k=4),
    "archetypal": dict(k=4, n_candidates=512),
    "ra": dict(k=4, n_candidates=512, delta=0.3),
    "mp": dict(k=4),
}


@cache
def _data(kind: str) -> toy.ToyData:
    if kind == "superposition":
        return toy.superposition(n_samples=8000, n_features=64, d=32, p_active=0.05, seed=0)
    return toy.correlated(n_samples=8000, d=48, seed=0)


def _fit(arch: str, kind: str = "superposition", seed: int = 0, d_sae: int = D_SAE, **sae) -> SAE:
    """Train (once per distinct setting: the runs are cached) on a toy data set."""
    return _fit_cached(arch, kind, seed, d_sae, tuple(sorted(sae.items())))


@cache
def _fit_cached(arch: str, kind: str, seed: int, d_sae: int, sae: tuple) -> SAE:
    cfg = TrainConfig(
        architecture=arch,
        sae={"d_sae": d_sae, **dict(sae)},
        steps=STEPS,
        batch_size=BATCH,
        lr=3e-3,
        checkpoint_every=STEPS,
        log_every=STEPS,
        init_sample=4096,
        seed=seed,
    )
    with tempfile.TemporaryDirectory() as out:
        return train(cfg, TensorBatches(_data(kind).x, BATCH, seed=seed), out, progress=False)


def _fvu(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return fvu(x, sae(x)).item()


# --- stability metric -----------------------------------------------------------------------------
def test_stability_is_one_for_a_permuted_copy_and_low_for_random() -> None:
    g = torch.Generator().manual_seed(0)
    d = torch.randn(50, 64, generator=g)
    shuffled = 3.0 * d[torch.randperm(50, generator=g)]
    assert stability(d, shuffled) == pytest.approx(1.0, abs=1e-6)
    assert stability(d, torch.randn(50, 64, generator=g)) < 0.5
    # Rectangular: the 50 atoms of d all find their copy among 80 atoms.
    assert matched_cosines(d, torch.cat([torch.randn(30, 64, generator=g), d])).min() > 0.999
    with pytest.raises(ValueError, match="same d"):
        stability(d, torch.randn(50, 63))


# --- configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arch", "kwargs", "field"),
    [
        ("switch", dict(d_sae=30, n_experts=4), "`d_sae`"),
        ("switch", dict(d_sae=32, n_experts=0), "`n_experts`"),
        ("switch", dict(d_sae=32, n_experts=4, k=9), "`k`"),
        (
            "switch",
            dict(d_sae=32, k=2, load_balance_coefficient=-1.0),
            "`load_balance_coefficient`",
        ),
        ("archetypal", dict(d_sae=32, delta=0.5), "`delta`"),
        ("archetypal", dict(d_sae=32, candidates="pca"), "`candidates`"),
        ("archetypal", dict(d_sae=32, n_candidates=0), "`n_candidates`"),
        ("archetypal", dict(d_sae=32, k=33), "`k`"),
        ("ra", dict(d_sae=32, delta=0.0), "`delta`"),
        ("mp", dict(d_sae=32, k=0), "`k`"),
    ],
)
def test_bad_config_names_the_field(arch: str, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_sae(arch, d_in=8, **kwargs)


def test_too_many_candidates_for_the_sample_is_a_clear_error() -> None:
    sae = build_sae("archetypal", d_in=8, d_sae=16, k=2, n_candidates=100)
    with pytest.raises(ValueError, match="init_sample"):
        sae.init_from_data(torch.rand(50, 8))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    sae = _fit(arch, **ARCHS[arch])
    loaded = SAE.load(sae.save(tmp_path / arch))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = _data("superposition").x[:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))


# --- ground truth ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_toy_ground_truth_recovery(arch: str) -> None:
    data = _data("superposition")
    sae = _fit(arch, **ARCHS[arch])
    got = recovery_metrics(data.features, sae.decoder_directions)
    floor = random_dictionary_baseline(data.features, D_SAE)
    assert got["mmcs"] > floor["mmcs"] + 0.35, (got, floor)
    assert got["recovered_0.9"] > 0.5, got
    assert _fvu(sae, data.x) < 0.4


# --- switch ---------------------------------------------------------------------------------------
def test_switch_code_lives_in_the_routed_expert_and_matches_a_dense_reference() -> None:
    sae = build_sae("switch", d_in=12, d_sae=32, n_experts=4, k=3, seed=3)
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))
    sae.init_from_data(x)
    z = sae.encode(x)
    probs = sae.router_probs(x)
    expert = probs.argmax(-1)
    width = 32 // 4
    owner = torch.arange(32) // width
    assert ((z > 0) & (owner[None] != expert[:, None])).sum() == 0
    assert ((z > 0).sum(-1) <= 3).all()
    # Dense reference: every expert encodes every token, then keep the routed expert's TopK.
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc).view(200, 4, width)
    mine = pre[torch.arange(200), expert]
    kept = torch.zeros_like(mine).scatter(-1, mine.topk(3, dim=-1).indices, 1.0) * mine
    ref = torch.zeros(200, 4, width)
    ref[torch.arange(200), expert] = kept * probs.max(-1).values[:, None]
    torch.testing.assert_close(z, ref.view(200, 32))
    torch.testing.assert_close(sae(x), sae.decode(z))


def test_switch_router_gets_gradient_from_the_reconstruction() -> None:
    sae = build_sae("switch", d_in=12, d_sae=32, n_experts=4, k=3, load_balance_coefficient=0.0)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    sae.loss(x).loss.backward()
    assert sae.W_router.grad is not None and sae.W_router.grad.abs().sum() > 0


def test_switch_load_balancing_spreads_tokens() -> None:
    x = _data("superposition").x[:4000]

    def max_share(coefficient: float) -> float:
        sae = _fit("switch", **{**ARCHS["switch"], "load_balance_coefficient": coefficient})
        with torch.no_grad():
            expert = sae.route(x).expert
        return torch.bincount(expert, minlength=sae.cfg.n_experts).max().item() / len(x)

    balanced, free = max_share(0.01), max_share(0.0)
    assert balanced < 0.7 < free, (balanced, free)


# --- archetypal -----------------------------------------------------------------------------------
def test_kmeans_lowers_the_inertia_of_its_random_start() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 5, generator=g) + 4 * torch.randint(0, 3, (600, 1), generator=g)
    start = x[torch.randperm(600, generator=torch.Generator().manual_seed(1))[:8]]
    centroids = kmeans(x, 8, 20, torch.Generator().manual_seed(1))

    def inertia(c: torch.Tensor) -> float:
        return torch.cdist(x, c).min(1).values.pow(2).sum().item()

    assert inertia(centroids) < 0.8 * inertia(start)


@pytest.mark.parametrize("arch", ["archetypal", "ra"])
def test_archetypal_constraints_hold_after_steps(arch: str) -> None:
    sae = _fit(arch, **ARCHS[arch])
    assert (sae.W >= 0).all()
    torch.testing.assert_close(sae.W.sum(1), torch.ones(D_SAE))
    expected = sae.W @ sae.C
    if arch == "ra":
        assert sae.Lambda.norm(dim=1).max() <= ARCHS["ra"]["delta"] * (1 + 1e-5)
        assert sae.Lambda.norm(dim=1).max() > 0  # the relaxation is used
        expected = expected + sae.Lambda
    torch.testing.assert_close(sae.decoder_directions, expected * sae.log_scale.exp())
    # The candidates are the data's k-means centroids: each lies near the data it summarises.
    data = _data("superposition").x
    assert torch.cdist(sae.C, data).min(1).values.mean() < data.norm(dim=1).mean()


def test_archetypal_is_more_stable_across_seeds_than_topk() -> None:
    """Paper 18's claim: stability(A-SAE) > stability(TopK SAE) for two seeds of each."""
    arch_pair = [_fit("archetypal", seed=s, **ARCHS["archetypal"]) for s in (0, 1)]
    topk_pair = [_fit("topk", seed=s, k=4) for s in (0, 1)]
    s_arch = stability(*(s.decoder_directions for s in arch_pair))
    s_topk = stability(*(s.decoder_directions for s in topk_pair))
    assert s_arch > s_topk + 0.05, (s_arch, s_topk)


# --- matching pursuit -----------------------------------------------------------------------------
def test_pursuit_gram_path_and_gradients_match_the_naive_unrolled_pursuit() -> None:
    g = torch.Generator().manual_seed(0)
    dictionary = torch.randn(60, 10, generator=g)
    dictionary = dictionary / dictionary.norm(dim=1, keepdim=True)
    x = torch.randn(40, 10, generator=g)
    assert torch.equal(
        pursuit_indices(x, dictionary, 6, True), pursuit_indices(x, dictionary, 6, False)
    )
    # Naive reference: back-propagate through the full score matrix at every step.
    d_ref = dictionary.clone().requires_grad_(True)
    r = x
    for _ in range(6):
        value, j = (r @ d_ref.t()).max(dim=-1)
        r = r - torch.relu(value)[:, None] * d_ref[j]
    r.pow(2).sum().backward()
    d_new = dictionary.clone().requires_grad_(True)
    values, _, residual = matching_pursuit(x, d_new, 6)
    residual.pow(2).sum().backward()
    torch.testing.assert_close(residual, r.detach())
    torch.testing.assert_close(d_new.grad, d_ref.grad, rtol=1e-4, atol=1e-5)
    assert (values >= 0).all()


def test_mp_reconstruction_improves_with_k() -> None:
    data = _data("superposition")
    sae = _fit("mp", **ARCHS["mp"])
    x = data.x[:2000] - sae.b_dec
    with torch.no_grad():
        errors = [matching_pursuit(x, sae.W_dec, k)[2].pow(2).sum().item() for k in (1, 2, 4, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Trained at k=2 vs k=4: more pursuit steps give a better reconstruction.
    assert _fvu(_fit("mp", k=2), data.x) > _fvu(sae, data.x)


def test_mp_on_correlated_features_matches_a_single_shot_topk() -> None:
    """Paper 41: the residual-guided encoder handles correlated features at least as well."""
    data = _data("correlated")
    mp = [_fit("mp", "correlated", seed=s, k=4) for s in (0, 1)]
    topk = [_fit("topk", "correlated", seed=s, k=4) for s in (0, 1)]

    def mean_mmcs(saes: list[SAE]) -> float:
        return sum(recovery_metrics(data.features, s.decoder_directions)["mmcs"] for s in saes) / 2

    assert mean_mmcs(mp) >= mean_mmcs(topk) - 0.01, (mean_mmcs(mp), mean_mmcs(topk))
    assert max(_fvu(s, data.x) for s in mp) < min(_fvu(s, data.x) for s in topk)
