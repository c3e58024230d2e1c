"""Universal SAE (paper 21): the registered architecture, its trainer round trip, and its
validation on ground-truth toy data (two "models" that are two linear views of one sparse code).

Toy runs are small (8k samples, 400 steps of 256) and cached per module.
"""

from __future__ import annotations

import json
import tempfile
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import Tensor

from common import toy
from common.evals.evaluate import evaluate
from common.evals.ground_truth import max_cosines, random_dictionary_baseline, recovery_metrics
from common.sae import SAE, TrainContext, available_architectures, build_sae
from common.sae.base import _expected_shapes, fvu
from common.sae.universal import UniversalSAE, concat_models
from common.train import TensorBatches, TrainConfig, make_optimizer, train, train_step

BATCH = 256


def _usae(d_models: list[int], d_sae: int = 16, k: int = 3, seed: int = 0) -> UniversalSAE:
    sae = build_sae("universal", d_in=sum(d_models), d_sae=d_sae, k=k, d_models=d_models, seed=seed)
    assert isinstance(sae, UniversalSAE)
    return sae


# --- config and interface -----------------------------------------------------------------------
def test_registered_and_config_is_checked():
    assert "universal" in available_architectures()
    with pytest.raises(ValueError, match=r"`d_models` \[4, 6\] sum to 10, but d_in is 12"):
        build_sae("universal", d_in=12, d_sae=8, k=2, d_models=[4, 6])
    with pytest.raises(ValueError, match="every width in `d_models` must be > 0"):
        build_sae("universal", d_in=12, d_sae=8, k=2, d_models=[12, 0])
    with pytest.raises(ValueError, match="`d_models` must be a non-empty list"):
        build_sae("universal", d_in=12, d_sae=8, k=2, d_models="12")
    with pytest.raises(ValueError, match=r"`k` must be an integer in \[1, d_sae=8\]"):
        build_sae("universal", d_in=12, d_sae=8, k=9, d_models=[4, 8])
    # a tuple is stored as the list that config.json reads back; None is one model of width d_in
    assert build_sae("universal", d_in=12, d_sae=8, k=2, d_models=(4, 8)).cfg.d_models == [4, 8]
    single = build_sae("universal", d_in=12, d_sae=8, k=2)
    assert single.cfg.d_models == [12] and single.model_for_step(5) == 0


def test_trainer_refuses_data_whose_width_is_not_the_sum_of_the_models():
    cfg = TrainConfig(
        architecture="universal", sae={"d_sae": 8, "k": 2, "d_models": [3, 4]}, steps=1
    )
    with tempfile.TemporaryDirectory() as out:
        with pytest.raises(ValueError, match=r"sum to 7, but d_in is 9"):
            train(cfg, TensorBatches(torch.randn(32, 9), 8), out, progress=False)


def test_encode_decode_per_model_and_the_standard_interface():
    sae = _usae([3, 5], d_sae=8, k=2)
    with torch.no_grad():
        for b in sae.b_enc:
            b.fill_(10.0)  # every pre-activation positive: TopK keeps exactly k
    x = torch.randn(6, 8)
    a0, a1 = sae.split(x)
    assert a0.shape == (6, 3) and a1.shape == (6, 5)
    z1 = sae.encode(a1, model=1)
    assert ((z1 > 0).sum(1) == 2).all() and (z1 >= 0).all()
    assert torch.equal(sae.encode(x, model=1), z1)  # the concatenation or the model's own block
    # decode(z) is every model side by side; decode(z, model=j) is model j's block of it
    both = sae.decode(z1)
    assert both.shape == (6, 8)
    assert torch.allclose(both, torch.cat([sae.decode(z1, 0), sae.decode(z1, 1)], 1), atol=1e-6)
    expected = z1 @ sae.decoder_of(0) + sae.b_dec[:3]
    assert torch.allclose(sae.decode(z1, model=0), expected, atol=1e-6)
    # the standard interface uses model 0's encoder
    assert torch.equal(sae.encode(x), sae.encode(a0, 0))
    assert torch.allclose(sae(x), sae.decode(sae.encode(a0, 0)))
    assert not torch.allclose(sae(x), sae(x, model=1))
    with pytest.raises(ValueError, match=r"width 4 given for model 0.*width 3.*d_in=8"):
        sae.encode(torch.randn(2, 4), 0)
    with pytest.raises(ValueError, match=r"model must be an integer in \[0, 1\]"):
        sae.decode(z1, model=2)
    with pytest.raises(ValueError, match=r"concatenated activations of all models, width d_in=8"):
        sae.loss_from(a1, 1)
    with pytest.raises(ValueError, match="paired"):
        concat_models([torch.randn(4, 2), torch.randn(5, 3)])


def test_loss_is_the_sum_over_models_from_the_drawn_encoder():
    sae = _usae([2, 3], d_sae=6, k=6)
    x = torch.randn(10, 5)
    for step in range(4):
        i = sae.model_for_step(step)
        out = sae.loss(x, TrainContext(step=step))
        z = sae.encode(x[:, sae.model_slice(i)], i)
        parts = [
            (a - z @ sae.decoder_of(j) - sae.b_dec[sae.model_slice(j)]).pow(2).sum(-1).mean()
            for j, a in enumerate(sae.split(x))
        ]
        assert out.loss.item() == pytest.approx(sum(p.item() for p in parts), rel=1e-5)
        assert out.terms["encoder"] == i
        for j, p in enumerate(parts):
            assert out.terms[f"mse_model{j}"] == pytest.approx(p.item(), rel=1e-5)
        assert out.x_hat.shape == x.shape and torch.equal(out.z, z)


def test_model_draw_is_uniform_deterministic_and_seeded():
    a, b, c = _usae([2, 3, 4]), _usae([2, 3, 4]), _usae([2, 3, 4], seed=1)
    draws = [a.model_for_step(t) for t in range(3000)]
    assert draws == [b.model_for_step(t) for t in range(3000)]
    assert draws != [c.model_for_step(t) for t in range(3000)]
    counts = [draws.count(m) for m in range(3)]
    assert all(900 < n < 1100 for n in counts), counts  # 1000 each, sd ~26


def test_a_step_updates_only_the_drawn_encoder_and_keeps_joint_unit_rows():
    sae = _usae([3, 5], d_sae=8, k=2)
    x = torch.randn(32, 8)
    sae.init_from_data(x)
    assert torch.allclose(sae.b_dec, x.mean(0))
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(8), atol=1e-6)
    # tied initialisation: each encoder is the transpose of its decoder block
    assert torch.equal(sae.W_enc[1], sae.decoder_of(1).t())
    cfg = TrainConfig(architecture="universal", lr=1e-2)
    opt = make_optimizer(sae, cfg)
    step = next(t for t in range(100) if sae.model_for_step(t) == 1)
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    train_step(sae, opt, x, step, cfg, torch.zeros(8, dtype=torch.long))
    assert sae.W_enc[0].grad is None and sae.b_enc[0].grad is None  # no gradient, no Adam state
    assert sae.W_enc[0] not in opt.state
    assert torch.equal(sae.W_enc[0], before["W_enc.0"])
    assert not torch.equal(sae.W_enc[1], before["W_enc.1"])
    assert not torch.equal(sae.W_dec, before["W_dec"])  # every decoder block learns every step
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(8), atol=1e-6)
    assert not torch.allclose(sae.decoder_of(0).norm(dim=1), torch.ones(8))  # only jointly


# --- registry and trainer round trip ------------------------------------------------------------
def _round_trip_cfg() -> TrainConfig:
    return TrainConfig(
        architecture="universal",
        sae={"d_sae": 16, "k": 3, "d_models": [5, 7]},
        steps=40,
        batch_size=64,
        lr=3e-3,
        lr_warmup_steps=5,
        lr_decay_fraction=0.2,
        checkpoint_every=10,
        log_every=10,
    )


def test_save_load_and_resume_after_interruption_give_the_same_weights(tmp_path: Path):
    x = torch.randn(600, 12) @ torch.randn(12, 12)
    cfg = _round_trip_cfg()
    full = train(cfg, TensorBatches(x, 64), tmp_path / "full", progress=False)
    train(cfg, TensorBatches(x, 64), tmp_path / "cut", progress=False, stop_after=17)
    ckpt = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert ckpt["step"] == 17 and not (tmp_path / "cut" / "sae").exists()
    resumed = train(cfg, TensorBatches(x, 64), tmp_path / "cut", progress=False)
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # both encoders were trained, so neither is at its initialisation
    init = build_sae("universal", d_in=12, seed=cfg.seed, **cfg.sae)
    assert not torch.equal(full.W_enc[0], init.W_enc[0])
    assert not torch.equal(full.W_enc[1], init.W_enc[1])
    # the saved SAE loads through the registry, checked on the meta device first
    folder = tmp_path / "full" / "sae"
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "universal" and config["d_models"] == [5, 7]
    config.pop("architecture")
    assert _expected_shapes("universal", config, folder / "config.json") is not None
    loaded = SAE.load(folder)
    assert isinstance(loaded, UniversalSAE) and loaded.cfg == full.cfg
    for key, value in full.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert torch.equal(loaded.encode(x[:8], 1), full.encode(x[:8], 1))


# --- ground truth: two views of one sparse code -------------------------------------------------
N_FEATURES, WIDTHS = 32, (24, 40)


@cache
def _two_views() -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
    """Paired activations of two "models" that see the same sparse nonnegative code c (32
    features, each on with p = 0.05, magnitude U[0.5, 2)) through different random unit features
    F_m in R^24 and R^40: A_m = c F_m, each standardised (centred, E||A_m||^2 = 1) as paper 21 does.
    Returns (x = [A_1 | A_2], the true joint features [F_1 s_1 | F_2 s_2], (F_1, F_2))."""
    g = torch.Generator().manual_seed(0)
    codes = toy.superposition(n_samples=8000, n_features=N_FEATURES, d=1, seed=0).codes
    feats = tuple(toy.random_features(N_FEATURES, d, g) for d in WIDTHS)
    blocks, scaled = [], []
    for f in feats:
        a = codes @ f
        scale = 1.0 / (a - a.mean(0)).pow(2).sum(1).mean().sqrt()
        blocks.append((a - a.mean(0)) * scale)
        scaled.append(f * scale)
    return concat_models(blocks), torch.cat(scaled, 1), feats  # type: ignore[return-value]


@cache
def _toy_usae(shuffled: bool) -> UniversalSAE:
    """A USAE trained on the paired views, or on them with model 2's rows permuted (the control:
    each model's distribution intact, the pairing gone)."""
    x, _, _ = _two_views()
    if shuffled:
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        x = torch.cat([x[:, : WIDTHS[0]], x[perm, WIDTHS[0] :]], 1)
    cfg = TrainConfig(
        architecture="universal",
        sae={"d_sae": 64, "k": 4, "d_models": list(WIDTHS)},
        steps=400,
        batch_size=BATCH,
        lr=3e-3,
        lr_decay_fraction=0.2,
        checkpoint_every=400,
        log_every=400,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only contends on a shared CPU
    try:
        with tempfile.TemporaryDirectory() as out:
            sae = train(cfg, TensorBatches(x, BATCH, seed=0), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert isinstance(sae, UniversalSAE)
    return sae


@torch.no_grad()
def _cross_fvu(sae: UniversalSAE, x: Tensor, i: int, j: int) -> float:
    a = sae.split(x)
    return fvu(a[j], sae.decode(sae.encode(a[i], i), j)).item()


def test_toy_cross_reconstruction_needs_the_pairing():
    x, _, _ = _two_views()
    paired, control = _toy_usae(shuffled=False), _toy_usae(shuffled=True)
    for i, j in ((0, 1), (1, 0)):
        cross, cross_control = _cross_fvu(paired, x, i, j), _cross_fvu(control, x, i, j)
        assert cross < 0.25, (i, j, cross)
        assert cross_control > 0.9, (i, j, cross_control)  # no better than predicting the mean
        assert cross < 0.25 * cross_control
    for m in range(2):  # each model on its own is reconstructed by both
        assert _cross_fvu(paired, x, m, m) < 0.2
        assert _cross_fvu(control, x, m, m) < 0.35
    # the standard interface (model 0's encoder, all models decoded) through common.evals
    metrics = evaluate(paired, x)
    assert metrics["fvu"] < 0.2 and metrics["l0"] <= 4


def test_toy_latents_recover_the_shared_features():
    x, joint, feats = _two_views()
    paired, control = _toy_usae(shuffled=False), _toy_usae(shuffled=True)
    rec = recovery_metrics(joint, paired.decoder_directions)
    floor = random_dictionary_baseline(joint, paired.cfg.d_sae)
    assert rec["mmcs"] > 0.95 and rec["recovered_0.9"] >= 0.9, rec
    assert floor["mmcs"] < 0.4 and rec["mmcs"] > floor["mmcs"] + 0.5
    # in each model's own space too, and by the *same* latent in both models
    best = []
    for m, f in enumerate(feats):
        assert recovery_metrics(f, paired.decoder_of(m))["mmcs"] > 0.95
        d = paired.decoder_of(m).detach()
        cos = (f @ (d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).t()).abs()
        best.append(cos.argmax(1))
    assert (best[0] == best[1]).float().mean() >= 0.75  # 0.94 here; chance is 1 / 64
    # without the pairing no latent holds a true feature in both models at once
    assert max_cosines(joint, control.decoder_directions).mean() < 0.85
