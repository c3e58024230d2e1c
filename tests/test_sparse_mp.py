"""MP-SAE (paper 41): the residual-free training step (``sparse_kernels=True``) against the dense
reference that replays the pursuit on residuals (``sparse_kernels=False``): same loss, same
reconstruction, same code, same gradients for every parameter."""

from __future__ import annotations

import pytest
import torch

from common.sae import build_sae
from common.sae.base import code_stats
from common.sae.mp import MPSAE, matching_pursuit, unique_entries


def _pair(d_in: int, d_sae: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[MPSAE, MPSAE]:
    """A sparse-kernel MP-SAE and a dense-reference copy with the same weights (b_dec != 0)."""
    torch.manual_seed(seed)
    sparse = build_sae("mp", d_in=d_in, d_sae=d_sae, k=k).to(dtype)
    dense = build_sae("mp", d_in=d_in, d_sae=d_sae, k=k, sparse_kernels=False).to(dtype)
    with torch.no_grad():
        sparse.b_dec.copy_(torch.randn(d_in, dtype=dtype) * 0.3)
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense  # type: ignore[return-value]


def _data(n: int, d_in: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d_in, generator=g) + 0.2).to(dtype)


@pytest.mark.parametrize("sparse_code", [False, True])
@pytest.mark.parametrize(("d_in", "d_sae", "k", "n"), [(16, 128, 4, 64), (24, 256, 8, 96)])
def test_sparse_step_matches_dense_reference_float64(
    d_in: int, d_sae: int, k: int, n: int, sparse_code: bool
) -> None:
    sparse, dense = _pair(d_in, d_sae, k, torch.float64)
    x = _data(n, d_in, torch.float64)
    assert sparse.uses_sparse_kernels(n) and not dense.uses_sparse_kernels(n)
    run = "loss_with_sparse_code" if sparse_code else "loss"
    out_s, out_d = getattr(sparse, run)(x), getattr(dense, run)(x)
    out_s.loss.backward()
    out_d.loss.backward()
    tight = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_s.loss, out_d.loss, **tight)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **tight)
    z_s, z_d = out_s.z.detach(), out_d.z.detach()
    assert z_s.is_sparse == z_d.is_sparse == sparse_code
    torch.testing.assert_close(z_s.to_dense(), z_d.to_dense(), **tight)
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(p.grad, dict(dense.named_parameters())[name].grad, **tight)
    (fired_s, l0_s), (fired_d, l0_d) = code_stats(z_s), code_stats(z_d)
    assert torch.equal(l0_s, l0_d)
    assert torch.equal(fired_s.unique(), fired_d.unique())


def test_sparse_step_matches_dense_reference_float32() -> None:
    sparse, dense = _pair(32, 256, 8, torch.float32)
    x = _data(128, 32, torch.float32)
    out_s, out_d = sparse.loss_with_sparse_code(x), dense.loss(x)
    out_s.loss.backward()
    out_d.loss.backward()
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_s.z.to_dense(), out_d.z.detach(), rtol=1e-5, atol=1e-5)
    for name, p in sparse.named_parameters():
        ref = dict(dense.named_parameters())[name].grad
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-5)


def test_repeated_atoms_and_zero_coefficients_match_the_replay() -> None:
    """A small dictionary (atoms picked twice, some pursuit steps with no positive score):
    the residual-free kernels, called directly, against ``matching_pursuit``'s replay."""
    sparse, _ = _pair(6, 8, 7, torch.float64, seed=3)
    x = _data(50, 6, torch.float64, seed=4) - 1.0
    x_hat, indices, values = sparse._reconstruct_sparse(x)
    x_hat.pow(2).sum().backward()
    grads = {name: p.grad.clone() for name, p in sparse.named_parameters()}
    sparse.zero_grad()
    ref_values, ref_indices, residual = matching_pursuit(x - sparse.b_dec, sparse.W_dec, 7)
    (x - residual).pow(2).sum().backward()
    assert torch.equal(indices, ref_indices)
    repeats = (indices.sort(1).values.diff(dim=1) == 0).any(1)
    assert repeats.any() and (ref_values == 0).any()
    torch.testing.assert_close(values, ref_values.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_hat, x - residual, rtol=1e-10, atol=1e-12)
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-10, atol=1e-12)
    rows, cols, vals = unique_entries(indices, values)
    z = torch.zeros(50, 8, dtype=torch.float64).index_put_((rows, cols), vals)
    torch.testing.assert_close(z, sparse.encode(x).detach(), rtol=1e-10, atol=1e-12)
    assert (rows.diff() >= 0).all() and rows.numel() < indices.numel()


def test_dense_codes_fall_back_to_the_reference() -> None:
    """k / d_sae above SPARSE_MAX_DENSITY, a batch too small for the Gram matrix, or the flag."""
    assert not build_sae("mp", d_in=8, d_sae=32, k=4).uses_sparse_kernels(256)
    assert not build_sae("mp", d_in=8, d_sae=512, k=4).uses_sparse_kernels(16)
    flag_off = build_sae("mp", d_in=8, d_sae=512, k=4, sparse_kernels=False)
    assert not flag_off.uses_sparse_kernels(256)
    assert build_sae("mp", d_in=8, d_sae=512, k=4).uses_sparse_kernels(256)
