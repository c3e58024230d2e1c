"""Matryoshka SAEs (paper 22: nested dictionaries; paper 28: nested k) on ground-truth toy data.

The absorption claim of paper 22 is tested on the hierarchical toy (parents + children that only
fire with their parent): a plain BatchTopK SAE (one prefix = d_sae) at the same k and width lets
child latents absorb the parent, the Matryoshka SAE does not (measure: common.evals.absorption_toy).
"""

from __future__ import annotations

import pytest
import torch

from common.evals.absorption_toy import absorption_metrics, per_parent_absorption
from common.evals.ground_truth import random_dictionary_baseline, recovery_metrics
from common.sae import SAE, TrainContext, build_sae
from common.sae.base import fvu
from common.sae.matryoshka import auxk_loss
from common.toy import ToyData, hierarchical, superposition
from common.train import TensorBatches, TrainConfig, train

BATCH = 256


def _train(arch: str, sae: dict, data: ToyData, tmp_path, steps: int = 1000, seed: int = 0) -> SAE:
    cfg = TrainConfig(
        architecture=arch,
        sae=sae,
        steps=steps,
        batch_size=BATCH,
        lr=3e-3,
        seed=seed,
        dead_after_tokens=BATCH * 50,
        checkpoint_every=10**6,
        log_every=10**6,
    )
    return train(cfg, TensorBatches(data.x, BATCH, seed=seed), tmp_path, progress=False)


@pytest.fixture(scope="module")
def toy() -> ToyData:
    return superposition(n_samples=20_000, n_features=64, d=32, p_active=0.05, seed=0)


@pytest.fixture(scope="module")
def matryoshka_sae(toy, tmp_path_factory) -> SAE:
    sae = dict(d_sae=64, k=4, prefixes=[0.25, 1.0])
    return _train("matryoshka", sae, toy, tmp_path_factory.mktemp("matryoshka"))


@pytest.fixture(scope="module")
def msae(toy, tmp_path_factory) -> SAE:
    return _train("msae", dict(d_sae=64, ks=[1, 2, 4, 8]), toy, tmp_path_factory.mktemp("msae"))


# --- ground-truth recovery --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["matryoshka_sae", "msae"])
def test_recovers_superposed_features(name, toy, request):
    sae = request.getfixturevalue(name)
    got = recovery_metrics(toy.features, sae.decoder_directions)
    floor = random_dictionary_baseline(toy.features, sae.cfg.d_sae)
    assert got["mmcs"] > floor["mmcs"] + 0.4, (got, floor)  # measured 0.93 / 0.997 vs 0.41
    assert got["recovered_0.9"] > 0.5, got


def test_matryoshka_eval_l0_near_k(matryoshka_sae, toy):
    k = matryoshka_sae.cfg.k
    assert matryoshka_sae.threshold.item() > 0  # estimated during training
    with torch.no_grad():
        matryoshka_sae.train()
        z_train = matryoshka_sae.encode(toy.x[:BATCH])
        matryoshka_sae.eval()
        z_eval = matryoshka_sae.encode(toy.x)
    assert (z_train > 0).sum().item() == BATCH * k  # BatchTopK: exactly B*k in a batch
    l0 = (z_eval > 0).float().sum(1).mean().item()
    assert 0.75 * k < l0 < 1.25 * k, l0  # measured 3.98 for k = 4
    assert fvu(toy.x, matryoshka_sae.decode(z_eval)).item() < 0.3


def test_msae_fvu_falls_as_k_grows(msae, toy):
    with torch.no_grad():
        codes = msae.encode_nested(toy.x)
        errors = [fvu(toy.x, msae.decode(z)).item() for z in codes]
        l0s = [(z > 0).float().sum(1).mean().item() for z in codes]
    assert all(b < a for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 0.2, errors  # measured 0.52, 0.28, 0.11, 0.083 for k = 1, 2, 4, 8
    assert all(l0 <= k for l0, k in zip(l0s, msae.cfg.ks, strict=True)), l0s
    # nested: the support of TopK_{k_i} is contained in that of TopK_{k_{i+1}}
    for small, large in zip(codes, codes[1:], strict=False):
        assert not ((small > 0) & (large == 0)).any()


def test_msae_inference_modes(msae, toy):
    x = toy.x[:512]
    with torch.no_grad():
        msae.eval()
        dense = msae.encode(x)
        assert torch.equal(dense, torch.relu(msae.pre_activations(x)))  # paper 28: ReLU only
        msae.cfg.inference_topk = True
        try:
            sparse = msae.encode(x)
        finally:
            msae.cfg.inference_topk = False
    assert ((sparse > 0).sum(1) <= msae.cfg.ks[-1]).all()
    assert (dense > 0).float().sum(1).mean() > (sparse > 0).float().sum(1).mean()


# --- the absorption claim (paper 22) -----------------------------------------------------------
def test_matryoshka_absorbs_less_than_plain_batchtopk(tmp_path):
    """Same k and width; plain BatchTopK = a single prefix [d_sae]. Measured (seeds 0, 1):
    plain absorption 0.23 / 0.18, Matryoshka -0.05 / -0.04."""
    rows = []
    for seed in (0, 1):
        data = hierarchical(n_samples=20_000, seed=seed)  # 16 parents, 48 children, d = 48
        d_sae = data.features.shape[0]
        n_parents = d_sae - data.parents.numel()
        result = {}
        for name, prefixes in (("plain", [d_sae]), ("matryoshka", [n_parents, d_sae])):
            sae = _train(
                "matryoshka",
                dict(d_sae=d_sae, k=3, prefixes=prefixes),
                data,
                tmp_path / f"{name}{seed}",
                seed=seed,
            )
            result[name] = absorption_metrics(sae, data)
        rows.append(result)
    for r in rows:
        assert r["plain"]["absorption"] > 0.1, r  # the toy does show absorption in a plain SAE
        assert r["plain"]["absorption"] > r["matryoshka"]["absorption"] + 0.1, r
        assert r["matryoshka"]["miss_child"] < 0.1, r
        assert r["matryoshka"]["parent_cosine"] > 0.8, r  # it did find the parents


def test_absorption_measure_on_hand_built_codes():
    """A dictionary equal to the true features: no absorption with the true codes; moving the
    parent into the children's latents whenever a child fires gives exactly A_child = 1."""
    data = hierarchical(n_samples=4000, seed=3)
    n_parents = data.features.shape[0] - data.parents.numel()
    exact = per_parent_absorption(data.features, data.codes, data)
    assert torch.allclose(exact["cosine"], torch.ones(n_parents))
    assert exact["absorption"].nanmean().item() == 0.0
    absorbed = data.codes.clone()
    child_on = data.codes[:, n_parents:] > 0
    counts = torch.zeros(len(data.x), n_parents).index_add_(1, data.parents, child_on.float())
    has_child = counts > 0
    absorbed[:, :n_parents][has_child] = 0.0
    per = per_parent_absorption(data.features, absorbed, data)
    assert torch.allclose(per["miss_child"], torch.ones(n_parents))
    assert torch.allclose(per["miss_alone"], torch.zeros(n_parents))


# --- pieces of the loss --------------------------------------------------------------------------
def test_matryoshka_loss_is_sum_of_prefix_errors():
    sae = build_sae("matryoshka", d_in=8, d_sae=12, k=3, group_sizes=[3, 3, 6], aux_coefficient=0)
    x = torch.randn(32, 8)
    out = sae.loss(x)
    expected = 0.0
    for m in (3, 6, 12):
        x_m = out.z[:, :m] @ sae.W_dec[:m] + sae.b_dec
        expected = expected + (x - x_m).pow(2).sum(1).mean()
    assert torch.allclose(out.loss, expected)
    mean = build_sae(
        "matryoshka",
        d_in=8,
        d_sae=12,
        k=3,
        prefixes=[3, 6, 12],
        prefix_loss="mean",
        aux_coefficient=0,
    )
    assert torch.allclose(mean.loss(x).loss, expected / 3)  # same seed, same weights


def test_auxk_trains_only_dead_latents():
    sae = build_sae("matryoshka", d_in=8, d_sae=16, k=2, prefixes=[16])
    x = torch.randn(64, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 5, 9]] = True
    pre = sae.pre_activations(x)
    loss = auxk_loss(pre, torch.randn(64, 8), sae.W_dec, dead, k_aux=2)
    loss.backward()
    touched = sae.W_dec.grad.abs().sum(1) > 0
    assert loss.item() > 0 and touched.any() and not touched[~dead].any()
    assert auxk_loss(pre, x, sae.W_dec, torch.zeros(16, dtype=torch.bool), 2).item() == 0.0
    with_dead = sae.loss(x, TrainContext(dead_mask=dead)).terms["auxk"]
    assert with_dead > 0 and sae.loss(x).terms["auxk"] == 0.0


def test_unit_norm_decoder_after_step():
    sae = build_sae("msae", d_in=8, d_sae=16, ks=[2, 4])
    sae.W_dec.data.mul_(3.0)
    sae.after_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16))


# --- persistence and configuration ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["matryoshka_sae", "msae"])
def test_save_load_round_trip(name, toy, request, tmp_path):
    sae = request.getfixturevalue(name)
    sae.eval()
    loaded = SAE.load(sae.save(tmp_path / name))
    loaded.eval()
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(sae.encode(toy.x[:256]), loaded.encode(toy.x[:256]))


@pytest.mark.parametrize(
    ("arch", "fields", "field_name"),
    [
        ("matryoshka", dict(prefixes=[32, 16, 64]), "prefixes"),
        ("matryoshka", dict(prefixes=[16, 32]), "prefixes"),  # does not end at d_sae
        ("matryoshka", dict(prefixes=[0.5, 0.25, 1.0]), "prefixes"),
        ("matryoshka", dict(group_sizes=[16, 16]), "group_sizes"),
        ("matryoshka", dict(k=0), "`k`"),
        ("matryoshka", dict(k=-3), "`k`"),
        ("matryoshka", dict(prefix_loss="max"), "prefix_loss"),
        ("msae", dict(ks=[4, 2, 8]), "ks"),
        ("msae", dict(ks=[0, 2]), "ks"),
        ("msae", dict(ks=[2, 4], alphas=[1.0]), "alphas"),
        ("msae", dict(ks=[2, 128]), "ks"),
    ],
)
def test_bad_config_names_the_field(arch, fields, field_name):
    with pytest.raises(ValueError, match=field_name):
        build_sae(arch, d_in=8, d_sae=64, **fields)


def test_prefix_forms_agree():
    a = build_sae("matryoshka", d_in=8, d_sae=64, prefixes=[16, 32, 64]).cfg.prefix_sizes()
    b = build_sae("matryoshka", d_in=8, d_sae=64, prefixes=[0.25, 0.5, 1.0]).cfg.prefix_sizes()
    c = build_sae("matryoshka", d_in=8, d_sae=64, group_sizes=[16, 16, 32]).cfg.prefix_sizes()
    assert a == b == c == [16, 32, 64]
    default = build_sae("matryoshka", d_in=8, d_sae=64).cfg.prefix_sizes()
    assert default == [4, 8, 16, 32, 64]
