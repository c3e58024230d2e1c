"""Unit tests of papers/21_universal/usae.py (the steps around the registered `universal` SAE)
on hand-made inputs."""

from __future__ import annotations

import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from common.sae import build_sae
from common.sae.universal import concat_models
from common.train import TensorBatches, TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("paper21_usae", ROOT / "papers/21_universal/usae.py")
usae = importlib.util.module_from_spec(_spec)
sys.modules["paper21_usae"] = usae
_spec.loader.exec_module(usae)


def test_cross_reconstruction_matrix_of_a_hand_built_usae():
    # Model 0 is x, model 1 is 2x (same information): a USAE whose code is ReLU of +-x
    # reconstructs both exactly from either side (FVU 0 everywhere).
    model = build_sae("universal", d_in=2, d_sae=2, k=2, d_models=[1, 1])
    with torch.no_grad():
        for m, scale in enumerate((1.0, 2.0)):
            model.W_enc[m].copy_(torch.tensor([[1.0, -1.0]]) / scale)
            model.b_enc[m].zero_()
        model.b_dec.zero_()
        model.W_dec.copy_(torch.tensor([[1.0, 2.0], [-1.0, -2.0]]))  # columns: model 0, model 1
    x = torch.linspace(-1, 1, 11)[:, None]
    fvu = usae.cross_reconstruction_fvu(model, [x, 2 * x])
    assert np.allclose(fvu, 0.0, atol=1e-10)
    assert usae.off_diagonal_mean(np.array([[0.1, 0.3], [0.5, 0.2]])) == pytest.approx(0.4)
    # a wrong model changes the matrix: model 1 decoded with a flipped sign is far off
    with torch.no_grad():
        model.W_dec[:, 1].neg_()
    assert usae.cross_reconstruction_fvu(model, [x, 2 * x])[0, 1] > 1.0
    with pytest.raises(ValueError, match="has 2 models"):
        usae.codes(model, [x])


def test_cofiring_and_firing_entropy_by_hand():
    # latent 0: both fire on rows 0-1 (cofire 1, entropy 1); latent 1: only model 0 fires
    # (cofire 0, entropy 0); latent 2: model 0 on rows 0-1, model 1 on rows 1-2 (cofire 1/3).
    z0 = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    z1 = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    c = usae.cofiring([z0, z1], min_fires=1)
    assert np.allclose(c["cofire"], [1.0, 0.0, 1 / 3])
    assert np.allclose(c["entropy"], [1.0, 0.0, 1.0])
    assert c["alive"].tolist() == [True, True, True]
    dead = usae.cofiring([z0, z1], min_fires=3)  # at most 3 rows fire for either
    assert dead["alive"].tolist() == [False, False, True]
    assert math.isnan(dead["cofire"][0])
    with pytest.raises(ValueError, match="same shape"):
        usae.cofiring([z0, z1[:, :2]])


def test_expected_cofire_of_independent_rates():
    z0 = torch.tensor([[1.0], [1.0], [0.0], [0.0]])  # rate 1/2
    z1 = torch.tensor([[1.0], [0.0], [0.0], [0.0]])  # rate 1/4
    # (1/2 * 1/4) / (1 - 1/2 * 3/4) = (1/8) / (5/8)
    assert usae.expected_cofire([z0, z1])[0] == pytest.approx(0.2)


def test_shuffle_pairing_keeps_model_zero_and_each_distribution():
    xs = [torch.arange(10.0)[:, None], torch.arange(10.0)[:, None] * 10]
    out = usae.shuffle_pairing(xs, seed=0)
    assert torch.equal(out[0], xs[0])
    assert sorted(out[1][:, 0].tolist()) == sorted(xs[1][:, 0].tolist())
    assert not torch.equal(out[1], xs[1])


def test_standardizer_and_ridge_recover_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g) * 4 + 1
    st = usae.Standardizer.fit(x)
    xs = st(x)
    assert xs.pow(2).sum(1).mean().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(xs.mean(0), torch.zeros(3), atol=1e-5)
    w_true = torch.tensor([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]])
    y = x @ w_true + torch.tensor([0.3, -0.7])
    w, b, alpha = usae.ridge_cv(x, y, [1e-8, 1.0, 100.0])
    assert alpha == 1e-8
    assert torch.allclose(w, w_true, atol=1e-3)
    assert torch.allclose(b, torch.tensor([0.3, -0.7]), atol=1e-3)


def _train_usae(xs, seed=0):
    """The notebook's training: the registered `universal` SAE on [A_1 | A_2] by common.train."""
    cfg = TrainConfig(
        architecture="universal",
        sae={"d_sae": 12, "k": 4, "d_models": [x.shape[1] for x in xs]},
        steps=100,
        batch_size=128,
        lr=0.02,
        lr_warmup_steps=5,
        lr_decay_fraction=0.2,
        checkpoint_every=100,
        seed=seed,
    )
    with tempfile.TemporaryDirectory() as out:
        batches = TensorBatches(concat_models(xs), 128, seed)
        return train(cfg, batches, out, resume=False, progress=False)


def test_training_on_shared_data_beats_shuffled_pairing():
    # Two "models" that are different linear views of one sparse source: a USAE trained on the
    # paired rows reconstructs across models far better than one trained with the pairing shuffled.
    g = torch.Generator().manual_seed(0)
    src = torch.relu(torch.randn(600, 6, generator=g)) * (torch.rand(600, 6, generator=g) < 0.3)
    xs = [src @ torch.randn(6, 8, generator=g), src @ torch.randn(6, 10, generator=g)]
    xs = [usae.Standardizer.fit(x)(x) for x in xs]
    paired = _train_usae(xs)
    control = _train_usae(usae.shuffle_pairing(xs, 0))
    cross = usae.off_diagonal_mean(usae.cross_reconstruction_fvu(paired, xs))
    cross_control = usae.off_diagonal_mean(usae.cross_reconstruction_fvu(control, xs))
    assert cross < 0.5 * cross_control
    assert {paired.model_for_step(t) for t in range(100)} == {0, 1}  # both encoders trained
    with pytest.raises(ValueError, match="paired"):
        concat_models([xs[0], xs[1][:5]])


def test_seed_metrics_hold_every_claims_path():
    # The notebook records usae.seed_metrics per seed; every lhs/rhs path of claims.yaml must be
    # in it, and the derived numbers follow from the matrices and summaries.
    import yaml

    u = np.array([[0.2, 0.3], [0.4, 0.1]])
    fvu = {
        "usae": u,
        "shuffled": np.array([[0.2, 0.9], [1.1, 0.1]]),
        "independent_map": np.array([[0.15, 0.5], [0.6, 0.05]]),
        "dense_ridge": np.array([[0.0, 0.2], [0.3, 0.0]]),
    }
    summary = dict.fromkeys(usae.SHARING_KEYS, 0.5) | {"chance_cofire_mean": 0.1}
    sharing = {k: dict(summary) for k in ("usae", "permuted_pairs", "shuffled")}
    m = usae.seed_metrics(fvu, sharing, 0.25)
    d = m["derived"]
    assert d["cross_fvu"] == pytest.approx(0.35) and d["self_fvu"] == pytest.approx(0.15)
    assert d["cross_minus_self_fvu"] == pytest.approx(((0.3 - 0.1) + (0.4 - 0.2)) / 2)
    assert d["cross_over_shuffled_cross"] == pytest.approx(0.35 / 1.0)
    assert m["fvu"]["usae"] == u.tolist() and d["top_image_overlap"] == 0.25
    claims = yaml.safe_load((ROOT / "papers/21_universal/claims.yaml").read_text())["claims"]
    for claim in claims:
        for side in ("lhs", "rhs"):
            if isinstance(claim[side], str):
                value = m
                for key in claim[side].split("."):
                    value = value[key]
                assert isinstance(value, float), (claim["id"], side)
    _, none_alive = usae.sharing_summary([torch.zeros(4, 3), torch.zeros(4, 3)], 1, 0.5)
    assert none_alive["alive_fraction"] == 0.0 and none_alive["shared_share"] is None
