"""Unit tests of papers/37_one_step/one_step.py on hand-made inputs with known answers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from common.sae import build_sae

_PATH = Path(__file__).resolve().parents[1] / "papers" / "37_one_step" / "one_step.py"
_SPEC = importlib.util.spec_from_file_location("one_step_paper37", _PATH)
one_step = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = one_step  # dataclasses look their module up here
_SPEC.loader.exec_module(one_step)


def test_fvu_perfect_mean_and_groups():
    x = torch.randn(50, 4)
    assert one_step.fvu(x, x) == pytest.approx(0.0)
    assert one_step.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, abs=1e-6)
    assert one_step.fvu(x, torch.zeros_like(x)) > 1.0 - 1e-6
    groups = torch.tensor([0] * 25 + [1] * 25)
    x_hat = x.clone()
    x_hat[groups == 1] = x[groups == 1].mean(0)
    out = one_step.fvu_by_group(x, x_hat, groups)
    assert out[0] == pytest.approx(0.0) and out[1] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError):
        one_step.fvu(x, x[:10])


def test_class_means_specificity_and_top_features():
    # latent 0 fires only for class 0 (2), latent 1 only for class 1 (4), latent 2 always (1)
    z = torch.tensor([[2.0, 0, 1], [2.0, 0, 1], [0, 4.0, 1], [0, 4.0, 1]])
    classes = torch.tensor([0, 0, 1, 1])
    mu = one_step.class_mean_codes(z, classes, 2)
    assert torch.allclose(mu, torch.tensor([[2.0, 0, 1], [0, 4.0, 1]]))
    spec = one_step.class_specificity(mu)
    assert torch.allclose(spec, torch.tensor([[2.0, -4.0, 0], [-2.0, 4.0, 0]]))
    assert one_step.top_class_features(spec, 1).flatten().tolist() == [0, 1]
    with pytest.raises(ValueError):
        one_step.top_class_features(spec, 4)
    assert torch.allclose(one_step.typical_activation(z), torch.tensor([2.0, 4.0, 1.0]))
    positions = torch.tensor([0, 1, 0, 1])
    maps = one_step.class_position_codes(z, classes, positions, 2, 2)
    assert maps.shape == (2, 2, 3) and torch.allclose(maps[1, 0], torch.tensor([0, 4.0, 1]))


def _guided_captions(n, positions):
    """Caption index of every token of a guided call: n unconditional rows (-1), then 0..n-1."""
    return torch.cat([torch.full((n,), -1), torch.arange(n)]).repeat_interleave(positions)


def _sae(d=4, s=8, k=2):
    torch.manual_seed(0)
    sae = build_sae("topk", d_in=d, d_sae=s, k=k, input_scale=2.0)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d) * 0.1)
    return sae.eval()


def test_make_edit_identity_ablation_and_cond_only():
    sae, n, positions = _sae(), 2, 3
    delta = torch.randn(2 * n * positions, 4)
    t, caps = torch.zeros(len(delta)), _guided_captions(n, positions)
    none = torch.zeros(n, 8, dtype=torch.bool)
    assert torch.equal(one_step.make_edit(sae, positions, ablate=none)(delta, t, caps), delta)
    everything = torch.ones(n, 8, dtype=torch.bool)
    out = one_step.make_edit(sae, positions, ablate=everything, cond_only=False)(delta, t, caps)
    _, x_hat = one_step.sae_codes(sae, delta)
    # removing every active latent leaves delta - (x_hat - b_dec) in raw units
    assert torch.allclose(out, delta - (x_hat - sae.b_dec / 2.0), atol=1e-5)
    out = one_step.make_edit(sae, positions, ablate=everything)(delta, t, caps)
    half = n * positions
    assert torch.equal(out[:half], delta[:half])  # unconditional rows untouched
    assert torch.allclose(out[half:], delta[half:] - (x_hat[half:] - sae.b_dec / 2.0), atol=1e-5)
    # random-direction control removes the same norm
    rand = one_step.random_unit(n, 4, 0)
    ctrl = one_step.make_edit(sae, positions, ablate=everything, random_ablate=rand)(delta, t, caps)
    removed = (delta - out).norm(dim=1)
    assert torch.allclose((delta - ctrl).norm(dim=1), removed, atol=1e-5)


def test_make_edit_adds_per_caption_and_per_position():
    sae, n, positions = _sae(), 2, 3
    delta = torch.zeros(2 * n * positions, 4)
    t, caps = torch.zeros(len(delta)), _guided_captions(n, positions)
    add = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    out = one_step.make_edit(sae, positions, add=add)(delta, t, caps)
    assert out[:6].abs().sum() == 0
    assert torch.equal(out[6:9], add[0].expand(3, 4)) and torch.equal(out[9:], add[1].expand(3, 4))
    per_pos = torch.arange(n * positions * 4, dtype=torch.float).view(n, positions, 4)
    out = one_step.make_edit(sae, positions, add=per_pos)(delta, t, caps)
    assert torch.equal(out[6:], per_pos.reshape(-1, 4))
    # without guidance every row is conditional: captions 0, 1 with no -1 rows
    caps = torch.arange(n).repeat_interleave(positions)
    out = one_step.make_edit(sae, positions, add=add)(delta[:6], t[:6], caps)
    assert torch.equal(out[:3], add[0].expand(3, 4)) and torch.equal(out[3:], add[1].expand(3, 4))


def test_unit_directions_and_reconstruction_edit():
    sae = _sae()
    dirs = one_step.unit_directions(sae)
    assert torch.allclose(dirs.norm(dim=1), torch.full((8,), 0.5), atol=1e-5)  # 1 / input_scale
    delta = torch.randn(5, 4)
    mean = torch.ones(4)
    assert torch.equal(one_step.reconstruction_edit(None, mean)(delta, None), mean.expand(5, 4))
    assert torch.allclose(
        one_step.reconstruction_edit(sae)(delta, None), one_step.sae_codes(sae, delta)[1]
    )
    with pytest.raises(ValueError):
        one_step.reconstruction_edit(None)
    r = one_step.random_unit(7, 5, 3)
    assert torch.allclose(r.norm(dim=1), torch.ones(7))


def test_frequency_energy_splits_low_and_high():
    flat = torch.full((1, 1, 16, 16), 0.5)  # constant change: only the DC term
    low, high = one_step.frequency_energy(flat, 2.0)
    assert low.item() == pytest.approx(0.25 * 256, rel=1e-5) and high.item() == pytest.approx(0)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((yy + xx) % 2).float().view(1, 1, 16, 16) - 0.5  # highest frequency
    low, high = one_step.frequency_energy(checker, 2.0)
    assert low.item() == pytest.approx(0, abs=1e-6) and high.item() == pytest.approx(64.0)
    x = torch.randn(3, 1, 16, 16)
    low, high = one_step.frequency_energy(x, 3.0)
    assert torch.allclose(low + high, x.pow(2).sum((1, 2, 3)), rtol=1e-4)  # Parseval
    assert one_step.radial_frequency(16)[0, 8] == 8 and one_step.radial_frequency(16)[0, 1] == 1


def test_edit_effects_rates():
    before = torch.zeros(4, 1, 16, 16)
    after = before.clone()
    after[0] += 1.0  # a constant (low-frequency) change of image 0 only
    pred_before = torch.tensor([0, 1, 2, 3])
    pred_after = torch.tensor([5, 1, 2, 5])
    out = one_step.edit_effects(before, after, pred_before, pred_after, 2.0, torch.tensor([5] * 4))
    assert out["flip_rate"] == 0.5 and out["target_rate"] == 0.5
    assert out["low_share"] == pytest.approx(1.0) and out["rms_high"] == pytest.approx(0.0)
    assert out["rms_low"] == pytest.approx(math.sqrt(0.25))
    assert out["rms_high_kept"] == pytest.approx(0.0)


def test_steering_pairs_sites_and_names():
    pairs = one_step.steering_pairs(10, 3, seed=0)
    assert len(pairs) == 30 and all(a != b for a, b in pairs)
    assert sorted({b for _, b in pairs}) == list(range(10))
    assert len(one_step.steering_pairs(3, 5, 0)) == 6  # capped at the n - 1 other classes
    assert one_step.short_name("unet.down_blocks.2.attentions.1") == "down.2.1"
    assert one_step.short_name("unet.mid_block.attentions.0") == "mid.0"
    valid = [
        "unet.down_blocks.1.attentions.0",
        "unet.down_blocks.2.attentions.0",
        "unet.mid_block.attentions.0",
        "unet.up_blocks.0.attentions.0",
        "unet.up_blocks.0.attentions.1",
        "unet.up_blocks.1.attentions.0",
        "unet.up_blocks.1.attentions.1",
    ]
    assert one_step.pick_sites(valid, "auto") == [valid[i] for i in (1, 2, 3, 4, 6)]
    assert one_step.pick_sites(valid[:4], "auto") == valid[:4]
    assert one_step.pick_sites(valid, [valid[0]]) == [valid[0]]
    with pytest.raises(ValueError):
        one_step.pick_sites(valid, ["unet.nope"])
    assert one_step.argmax_index([None, 0.2, 0.5, None]) == 2
    assert one_step.argmax_index([None]) is None
