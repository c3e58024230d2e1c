"""The sparse training path of the JumpReLU SAE against its dense reference (``sparse_kernels``).

The sparse step keeps only the entries with u = (pre - theta) / epsilon > -1/2 (the code and the
straight-through window); values and gradients of every parameter must equal the dense step's.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from common.sae import build_sae
from common.sae.base import TrainContext, code_stats
from common.sae.jumprelu import JumpReluSAE

D_IN, D_SAE, BATCH = 16, 96, 128


def _pair(dtype: torch.dtype, **hyper: float | bool) -> tuple[JumpReluSAE, JumpReluSAE, Tensor]:
    """A sparse and a dense (reference) SAE with the same weights, and a batch x on which about 5%
    of the code fires and the bandwidth window holds entries on both sides of the threshold."""
    g = torch.Generator().manual_seed(0)
    hyper = {"bandwidth": 0.3, **hyper}
    sparse = build_sae("jumprelu", d_in=D_IN, d_sae=D_SAE, sparse_kernels=True, **hyper)
    dense = build_sae("jumprelu", d_in=D_IN, d_sae=D_SAE, sparse_kernels=False, **hyper)
    assert isinstance(sparse, JumpReluSAE) and isinstance(dense, JumpReluSAE)
    sparse, dense = sparse.to(dtype), dense.to(dtype)
    x = torch.randn(BATCH, D_IN, generator=g, dtype=dtype)
    with torch.no_grad():
        sparse.b_dec.copy_(0.1 * torch.randn(D_IN, generator=g))
        sparse.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=g))
        sparse.W_dec.mul_(1 + torch.rand(D_SAE, 1, generator=g))
        # pre ~ N(0, ~1) per latent: thresholds in [1.6, 2.4] leave about 3% firing
        theta = 1.6 + 0.8 * torch.rand(D_SAE, generator=g)
        sparse.log_threshold.copy_(theta.log())
    dense.load_state_dict(sparse.state_dict())
    return sparse, dense, x


def _grads(sae: JumpReluSAE, x: Tensor, ctx: TrainContext, sparse_code: bool):
    """(loss output, {name: grad}, dL/dx) of one training loss."""
    x = x.clone().requires_grad_(True)
    out = (sae.loss_with_sparse_code if sparse_code else sae.loss)(x, ctx)
    out.loss.backward()
    grads = {name: p.grad for name, p in sae.named_parameters()}
    return out, grads, x.grad


@pytest.mark.parametrize(
    "hyper,step",
    [
        ({}, 0),
        ({"l0_coefficient": 0.0}, 0),
        ({"l0_coefficient": 0.05, "l0_warmup_steps": 10}, 3),
        ({"l0_coefficient": 0.05, "unit_norm_decoder": False}, 0),
    ],
)
@pytest.mark.parametrize("sparse_code", [False, True])
def test_sparse_step_matches_dense_gradients(hyper: dict, step: int, sparse_code: bool) -> None:
    sparse, dense, x = _pair(torch.float64, **hyper)
    entries = sparse.ste_entries(x)
    assert entries is not None, "the test batch must take the sparse path"
    rows, cols, vals = entries
    theta = sparse.threshold.detach()[cols]
    u = (vals - theta) / sparse.cfg.bandwidth
    assert (u > 0).sum() > 0 and ((u > -0.5) & (u <= 0)).sum() > 0  # window entries with z = 0

    ctx = TrainContext(step=step, total_steps=100)
    out_s, grads_s, gx_s = _grads(sparse, x, ctx, sparse_code)
    out_d, grads_d, gx_d = _grads(dense, x, ctx, sparse_code=False)

    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-12, atol=1e-12)
    z_s = out_s.z.to_dense() if out_s.z.is_sparse else out_s.z
    assert out_s.z.is_sparse == sparse_code
    torch.testing.assert_close(z_s, out_d.z.detach(), rtol=1e-12, atol=1e-12)
    assert out_s.terms == pytest.approx(out_d.terms, rel=1e-12)
    for name, grad in grads_d.items():
        assert grad is not None and grads_s[name] is not None, name
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-10, atol=1e-12)
    # theta is trained by the window alone on latents with no firing entry inside it
    assert (grads_s["log_threshold"] != 0).sum() > 0


def test_sparse_step_matches_dense_in_float32() -> None:
    sparse, dense, x = _pair(torch.float32, l0_coefficient=0.05)
    out_s, grads_s, gx_s = _grads(sparse, x, TrainContext(), sparse_code=True)
    out_d, grads_d, gx_d = _grads(dense, x, TrainContext(), sparse_code=False)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-5, atol=1e-6)
    for name, grad in grads_d.items():
        torch.testing.assert_close(grads_s[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(gx_s, gx_d, rtol=1e-5, atol=1e-6)
    fired_s, l0_s = code_stats(out_s.z)
    fired_d, l0_d = code_stats(out_d.z)
    assert torch.equal(torch.zeros_like(fired_d).index_fill_(0, fired_s, True), fired_d)
    torch.testing.assert_close(l0_s, l0_d)


def test_dense_code_falls_back_to_the_dense_step() -> None:
    """At the initial threshold about half the latents fire: too dense for the sparse kernels."""
    sparse, dense, x = _pair(torch.float64)
    with torch.no_grad():
        sparse.log_threshold.fill_(math.log(1e-3))
    dense.load_state_dict(sparse.state_dict())
    assert sparse.ste_entries(x) is None
    out_s, grads_s, _ = _grads(sparse, x, TrainContext(), sparse_code=True)
    out_d, grads_d, _ = _grads(dense, x, TrainContext(), sparse_code=False)
    assert not out_s.z.is_sparse
    torch.testing.assert_close(out_s.loss, out_d.loss)
    for name, grad in grads_d.items():
        torch.testing.assert_close(grads_s[name], grad, msg=name)


def test_inference_is_unchanged_by_the_flag() -> None:
    sparse, dense, x = _pair(torch.float32)
    torch.testing.assert_close(sparse.encode(x), dense.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(sparse(x), dense(x), rtol=0, atol=0)
