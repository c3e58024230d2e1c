"""The sparse training path of the gated SAE (``common/sae/gated.py``) against its dense reference.

Both paths compute L = ||x - x_hat||^2 + lambda * L1(ReLU(pi_gate)) + ||x - x_hat_frozen||^2
(Rajamanoharan et al. 2024); the sparse one sums over the open-gate entries only. Values and
gradients of every parameter must agree to float tolerance, for each decoder-norm option, with and
without the L1 term.
"""

from __future__ import annotations

import pytest
import torch

from common.sae import build_sae
from common.sae.base import TrainContext, code_stats
from common.sae.gated import GatedSAE

D_IN, D_SAE, N = 24, 96, 200
OPTIONS = {
    "unit_norm": {"unit_norm_decoder": True, "decoder_norm_l1": False},
    "decoder_norm_l1": {"unit_norm_decoder": False, "decoder_norm_l1": True},
    "plain_l1": {"unit_norm_decoder": False, "decoder_norm_l1": False},
}


def _pair(dtype: torch.dtype, l1: float, options: dict, seed: int = 0) -> tuple[GatedSAE, GatedSAE]:
    """Two copies of one gated SAE, sparse and dense, with about 5% of the gates open and some
    negative magnitude pre-activations among them (so ReLU(pi_mag) clips some open entries)."""
    g = torch.Generator().manual_seed(seed)
    sparse = build_sae("gated", d_in=D_IN, d_sae=D_SAE, seed=seed, l1_coefficient=l1, **options)
    with torch.no_grad():
        sparse.W_dec.mul_(1 + torch.rand(D_SAE, 1, generator=g))  # rows of different norms
        sparse.b_gate.copy_(-2.0 + 0.3 * torch.randn(D_SAE, generator=g))
        sparse.r_mag.copy_(0.5 * torch.randn(D_SAE, generator=g))
        sparse.b_mag.copy_(torch.randn(D_SAE, generator=g))
        sparse.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
    sparse = sparse.to(dtype)
    dense = build_sae("gated", d_in=D_IN, d_sae=D_SAE, seed=seed, l1_coefficient=l1, **options)
    dense = dense.to(dtype)
    dense.load_state_dict(sparse.state_dict())
    dense.cfg.sparse_kernels = False
    return sparse, dense


def _x(dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("l1", [0.0, 0.3])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_sparse_gradients_match_dense_autograd(option: str, l1: float) -> None:
    """float64: loss, x_hat, z and the gradient of every parameter (and of x) agree tightly."""
    sparse, dense = _pair(torch.float64, l1, OPTIONS[option])
    x = _x(torch.float64)
    gates = sparse.open_gates(x)
    assert gates is not None, "the sparse path must be taken"
    density = gates.rows.numel() / (N * D_SAE)
    assert 0.01 < density < 0.1, density
    ctx = TrainContext(step=3)
    grads = {}
    for name, sae in (("sparse", sparse), ("dense", dense)):
        xg = x.clone().requires_grad_(True)
        out = sae.loss(xg, ctx)
        out.loss.backward()
        grads[name] = (out, {k: p.grad for k, p in sae.named_parameters()}, xg.grad)
    (s_out, s_grad, s_xgrad), (d_out, d_grad, d_xgrad) = grads["sparse"], grads["dense"]
    torch.testing.assert_close(s_out.loss, d_out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_out.x_hat, d_out.x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_out.z, d_out.z.detach(), rtol=1e-12, atol=1e-12)
    assert s_out.terms.keys() == d_out.terms.keys()
    for key, value in d_out.terms.items():
        assert s_out.terms[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert s_grad.keys() == d_grad.keys() == {"W_enc", "W_dec", "b_gate", "r_mag", "b_mag", "b_dec"}
    for key, expected in d_grad.items():
        assert s_grad[key] is not None, key
        torch.testing.assert_close(s_grad[key], expected, rtol=1e-10, atol=1e-12, msg=key)
    torch.testing.assert_close(s_xgrad, d_xgrad, rtol=1e-10, atol=1e-12)
    # the magnitude ReLU clipped some open entries, and some survived
    assert 0 < (d_out.z > 0).sum() < gates.rows.numel()


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_sparse_matches_dense_in_float32(option: str) -> None:
    sparse, dense = _pair(torch.float32, 0.3, OPTIONS[option])
    x = _x(torch.float32)
    s_out, d_out = sparse.loss(x), dense.loss(x)
    s_out.loss.backward()
    d_out.loss.backward()
    torch.testing.assert_close(s_out.loss, d_out.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_out.x_hat, d_out.x_hat, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_loss_with_sparse_code_returns_the_code_as_sparse_entries() -> None:
    sparse, dense = _pair(torch.float64, 0.3, OPTIONS["unit_norm"])
    x = _x(torch.float64)
    z = sparse.loss_with_sparse_code(x).z
    assert z.is_sparse
    reference = dense.loss(x).z.detach()
    torch.testing.assert_close(z.to_dense(), reference)
    fired, l0 = code_stats(z)
    ref_fired, ref_l0 = code_stats(reference)
    assert torch.equal(torch.zeros(D_SAE, dtype=torch.bool).index_fill_(0, fired, True), ref_fired)
    assert l0.item() == pytest.approx(ref_l0.item())


def test_dense_gates_fall_back_to_the_dense_path() -> None:
    """With most gates open (early training) the sparse kernels would lose: the dense step runs,
    with the same result as the reference."""
    sparse, dense = _pair(torch.float64, 0.3, OPTIONS["unit_norm"])
    with torch.no_grad():
        for sae in (sparse, dense):
            sae.b_gate.fill_(0.5)
    x = _x(torch.float64)
    assert sparse.open_gates(x) is None
    out = sparse.loss_with_sparse_code(x)
    assert not out.z.is_sparse
    out.loss.backward()
    dense.loss(x).loss.backward()
    for (name, p), q in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_frozen_decoder_term_does_not_train_the_decoder_in_the_sparse_path() -> None:
    """W_dec gets the same gradient with or without the auxiliary reconstruction."""
    sparse, _ = _pair(torch.float64, 0.0, OPTIONS["unit_norm"])
    x = _x(torch.float64)
    gates = sparse.open_gates(x)
    assert gates is not None
    terms = sparse._terms_sparse(x, gates, dense_z=True)
    main = ((x - terms.x_hat) ** 2).sum(-1).mean()
    aux = ((x - terms.x_hat_frozen) ** 2).sum(-1).mean()
    w_main = torch.autograd.grad(main, sparse.W_dec, retain_graph=True)[0]
    w_both = torch.autograd.grad(main + aux, sparse.W_dec, retain_graph=True)[0]
    torch.testing.assert_close(w_main, w_both)
    assert torch.autograd.grad(aux, sparse.b_gate)[0].abs().sum() > 0  # it trains the gate
