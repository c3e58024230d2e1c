"""Gated (paper 2) and JumpReLU (Rajamanoharan et al. 2024) SAEs on ground-truth toy data.

Training runs are small (8k samples, 1000 steps of 256) and shared through module-scoped caches.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import Tensor

from common import toy
from common.evals.ground_truth import random_dictionary_baseline, recovery_metrics
from common.sae import SAE, build_sae
from common.sae.base import fvu, reconstruction_mse
from common.sae.jumprelu import HeavisideSTE, JumpReLUSTE
from common.train import TensorBatches, TrainConfig, train

D_SAE = 128
STEPS = 1000
BATCH = 256
GATED = {"d_sae": D_SAE, "l1_coefficient": 1.0}
RELU = {"d_sae": D_SAE, "l1_coefficient": 1.0}
JUMPRELU = {"d_sae": D_SAE, "l0_coefficient": 0.1, "bandwidth": 0.05, "initial_threshold": 0.1}


def relative_reconstruction_bias(x: Tensor, x_hat: Tensor) -> float:
    """gamma = argmin_g E||x_hat / g - x||^2 = E||x_hat||^2 / E<x_hat, x>  (paper 2, Sec. 5.2).

    gamma = 1: unbiased; gamma < 1: the reconstruction is shrunk towards zero.
    """
    return (x_hat.pow(2).sum() / (x_hat * x).sum()).item()


@cache
def _data(kind: str) -> toy.ToyData:
    return toy.GENERATORS[kind](n_samples=8000, seed=0)


@cache
def _fit(arch: str, kind: str, sae_items: tuple[tuple[str, float], ...]) -> tuple[SAE, dict]:
    """Train ``arch`` on toy data ``kind``; return the SAE and its metrics on held-in samples."""
    import tempfile

    data = _data(kind)
    cfg = TrainConfig(
        architecture=arch,
        sae=dict(sae_items),
        steps=STEPS,
        batch_size=BATCH,
        lr=3e-3,
        checkpoint_every=STEPS,
        log_every=STEPS,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend on a shared CPU
    try:
        with tempfile.TemporaryDirectory() as out:
            sae = train(cfg, TensorBatches(data.x, BATCH, seed=0), out, progress=False)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        x = data.x[:4000]
        z = sae.encode(x)
        x_hat = sae.decode(z)
        metrics = {
            **recovery_metrics(data.features, sae.decoder_directions),
            "l0": (z > 0).float().sum(-1).mean().item(),
            "fvu": fvu(x, x_hat).item(),
            "gamma": relative_reconstruction_bias(x, x_hat),
        }
    return sae, metrics


def fit(arch: str, kind: str, sae_kwargs: dict) -> tuple[SAE, dict]:
    return _fit(arch, kind, tuple(sorted(sae_kwargs.items())))


# --- ground-truth recovery ---------------------------------------------------------------------
@pytest.mark.parametrize("arch,hyper", [("gated", GATED), ("jumprelu", JUMPRELU)])
def test_recovers_superposition_features(arch: str, hyper: dict) -> None:
    data = _data("superposition")
    _, m = fit(arch, "superposition", hyper)
    base = random_dictionary_baseline(data.features, D_SAE)
    assert m["mmcs"] > base["mmcs"] + 0.4, (m, base)
    assert m["recovered_0.9"] > 0.9, m
    assert 0.75 * data.true_l0 < m["l0"] < 1.5 * data.true_l0, (m, data.true_l0)


def test_gated_shrinks_less_than_relu_on_known_magnitudes() -> None:
    """Same L1 coefficient, comparable L0: the gate's L1 does not shrink the magnitudes."""
    _, gated = fit("gated", "known_magnitudes", GATED)
    _, relu = fit("relu", "known_magnitudes", RELU)
    assert abs(gated["l0"] - relu["l0"]) < 0.25 * relu["l0"], (gated, relu)  # comparable sparsity
    assert relu["gamma"] < 0.8, relu  # L1 shrinkage is real at this coefficient...
    assert gated["gamma"] > 0.95, gated  # ...and the gated SAE removes it
    assert gated["fvu"] < 0.5 * relu["fvu"], (gated, relu)


def test_jumprelu_l0_falls_as_coefficient_rises() -> None:
    """A larger L0 coefficient gives a sparser SAE, through larger learned thresholds."""
    runs = [
        fit("jumprelu", "superposition", {**JUMPRELU, "l0_coefficient": lam})
        for lam in (0.01, 0.1, 0.5)
    ]
    l0s = [m["l0"] for _, m in runs]
    thresholds = [sae.threshold.median().item() for sae, _ in runs]
    assert l0s[0] > l0s[1] > l0s[2], l0s
    assert thresholds[0] < thresholds[1] < thresholds[2], thresholds
    assert thresholds[1] > 2 * JUMPRELU["initial_threshold"], thresholds  # the thresholds learned


# --- the straight-through estimators -------------------------------------------------------------
def test_ste_pseudo_gradients_estimate_the_expected_gradient() -> None:
    """For pre ~ N(0, 1): d/dtheta E[H(pre - theta)] = -phi(theta) and
    d/dtheta E[JumpReLU_theta(pre)] = -theta phi(theta); the STEs are kernel estimates of both."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(200_000, 3, generator=g)
    theta_values = torch.tensor([0.2, 0.5, 1.0])
    phi = torch.exp(-(theta_values**2) / 2) / math.sqrt(2 * math.pi)

    theta = theta_values.clone().requires_grad_(True)
    HeavisideSTE.apply(pre, theta, 0.05).mean(0).sum().backward()
    torch.testing.assert_close(theta.grad, -phi, rtol=0.1, atol=0.0)

    theta = theta_values.clone().requires_grad_(True)
    pre_leaf = pre.clone().requires_grad_(True)
    JumpReLUSTE.apply(pre_leaf, theta, 0.05).mean(0).sum().backward()
    torch.testing.assert_close(theta.grad, -theta_values * phi, rtol=0.1, atol=0.0)
    # d/dpre JumpReLU = H(pre - theta): the gradient reaches only the latents that fired
    assert torch.equal(pre_leaf.grad != 0, pre > theta_values)


def test_jumprelu_loss_gives_threshold_a_gradient() -> None:
    sae = build_sae("jumprelu", d_in=32, d_sae=64, bandwidth=0.5, initial_threshold=0.5)
    x = _data("superposition").x[:512]
    sae.loss(x).loss.backward()
    grad = sae.log_threshold.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad != 0).float().mean() > 0.5, grad


def test_gated_auxiliary_loss_does_not_train_the_decoder() -> None:
    """The frozen-decoder term trains the gate only: W_dec's gradient is the main MSE's alone."""
    sae = build_sae("gated", d_in=32, d_sae=64, l1_coefficient=0.0)
    with torch.no_grad():
        sae.b_gate.fill_(0.1)  # some gates open
    x = _data("superposition").x[:256]
    out = sae.loss(x)
    full = torch.autograd.grad(out.loss, [sae.W_dec, sae.b_gate])
    mse = reconstruction_mse(x, sae(x))
    mse_only = torch.autograd.grad(mse, [sae.W_dec, sae.b_gate], allow_unused=True)
    torch.testing.assert_close(full[0], mse_only[0])
    assert mse_only[1] is None  # the step 1[pi_gate > 0] passes no gradient to b_gate...
    assert full[1].abs().sum() > 0  # ...so the gate is trained by the auxiliary term


# --- persistence and configuration ------------------------------------------------------------
@pytest.mark.parametrize(
    "arch,hyper",
    [
        ("gated", {"l1_coefficient": 0.5, "unit_norm_decoder": False, "decoder_norm_l1": True}),
        ("jumprelu", {"l0_coefficient": 0.2, "bandwidth": 0.1, "initial_threshold": 0.05}),
    ],
)
def test_save_load_round_trip(arch: str, hyper: dict, tmp_path: Path) -> None:
    sae = build_sae(arch, d_in=32, d_sae=64, seed=3, **hyper)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = _data("superposition").x[:256]
    loaded = SAE.load(sae.save(tmp_path / arch))
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    z = sae.encode(x)
    assert (z > 0).any()
    torch.testing.assert_close(loaded.encode(x), z, rtol=0, atol=0)


@pytest.mark.parametrize(
    "arch,field,value",
    [
        ("gated", "l1_coefficient", -1.0),
        ("gated", "l1_warmup_steps", -5),
        ("jumprelu", "l0_coefficient", -0.1),
        ("jumprelu", "bandwidth", 0.0),
        ("jumprelu", "bandwidth", -0.01),
        ("jumprelu", "initial_threshold", 0.0),
        ("jumprelu", "l0_warmup_steps", -1),
    ],
)
def test_bad_hyperparameters_name_the_field(arch: str, field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        build_sae(arch, d_in=8, d_sae=16, **{field: value})


def test_gated_rejects_both_decoder_norm_options() -> None:
    with pytest.raises(ValueError, match="unit_norm_decoder"):
        build_sae("gated", d_in=8, d_sae=16, unit_norm_decoder=True, decoder_norm_l1=True)


def test_parameter_names_match_saelens() -> None:
    gated = build_sae("gated", d_in=8, d_sae=16)
    shapes = {k: tuple(v.shape) for k, v in gated.state_dict().items()}
    assert shapes == {
        "W_enc": (8, 16),
        "b_gate": (16,),
        "r_mag": (16,),
        "b_mag": (16,),
        "W_dec": (16, 8),
        "b_dec": (8,),
    }
    jump = build_sae("jumprelu", d_in=8, d_sae=16, initial_threshold=0.25)
    shapes = {k: tuple(v.shape) for k, v in jump.state_dict().items()}
    assert shapes == {
        "W_enc": (8, 16),
        "b_enc": (16,),
        "log_threshold": (16,),
        "W_dec": (16, 8),
        "b_dec": (8,),
    }
    torch.testing.assert_close(jump.threshold, torch.full((16,), 0.25))
