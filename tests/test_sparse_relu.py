"""The sparse training path of the ReLU + L1 SAE (``common/sae/relu.py``) against the dense one.

``sparse_kernels=True`` computes the dense pre-activations once and everything after them on the
firing entries only; the loss, its terms, the code and every gradient must equal those of the
dense path (``sparse_kernels=False``), tied and untied, with and without the decoder-norm-weighted
L1, during and after the L1 warm-up.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from common.sae import TrainContext, build_sae
from common.sae.base import code_stats
from common.sae.relu import ReluSAE
from common.sae.sparse_ops import SPARSE_MAX_DENSITY

D_IN, D_SAE, N = 24, 192, 128

VARIANTS = {
    "untied": {},
    "tied": {"tied": True},
    "decoder_norm_l1": {"unit_norm_decoder": False, "decoder_norm_l1": True},
    "tied_decoder_norm_l1": {"tied": True, "unit_norm_decoder": False, "decoder_norm_l1": True},
}


def _pair(dtype: torch.dtype, density: float, **hyper) -> tuple[ReluSAE, ReluSAE, Tensor]:
    """A ReLU SAE with perturbed weights, its dense twin, and a batch on which about ``density``
    of the code's entries fire (0: none)."""
    torch.manual_seed(0)
    sae = build_sae("relu", d_in=D_IN, d_sae=D_SAE, l1_coefficient=0.3, **hyper).to(dtype)
    x = (torch.randn(N, D_IN) * 2 + 1).to(dtype)
    sae.init_from_data(x)
    with torch.no_grad():
        for p in sae.parameters():  # free decoder norms, nonzero biases: every term matters
            p.add_(0.1 * torch.randn_like(p))
        pre = sae.pre_activations(x)
        shift = pre.max() + 1 if density == 0 else pre.flatten().quantile(1 - density)
        sae.b_enc.sub_(shift)
    dense = copy.deepcopy(sae)
    dense.cfg.sparse_kernels = False
    assert isinstance(sae, ReluSAE) and isinstance(dense, ReluSAE)
    return sae, dense, x


def _density(sae: ReluSAE, x: Tensor) -> float:
    with torch.no_grad():
        return (sae.encode(x) > 0).float().mean().item()


def _run(sae: ReluSAE, x: Tensor, step: int, sparse_code: bool):
    """Loss output and the gradients of every parameter and of x."""
    x = x.clone().requires_grad_(True)
    fn = sae.loss_with_sparse_code if sparse_code else sae.loss
    out = fn(x, TrainContext(step=step, total_steps=100))
    out.loss.backward()
    grads = {name: p.grad for name, p in sae.named_parameters()}
    return out, {**grads, "x": x.grad}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("step", [3, 50])  # during and after a 10-step warm-up
def test_sparse_path_matches_dense_float64(variant: str, step: int) -> None:
    """Loss, terms, x_hat, z and all gradients (W_enc, W_dec, b_enc, b_dec, x) in float64."""
    sae, dense, x = _pair(torch.float64, density=0.04, l1_warmup_steps=10, **VARIANTS[variant])
    assert 0.02 < _density(sae, x) < SPARSE_MAX_DENSITY  # the sparse path is taken
    out_s, g_s = _run(sae, x, step, sparse_code=True)
    out_d, g_d = _run(dense, x, step, sparse_code=False)
    assert out_s.z.is_sparse and not out_d.z.is_sparse
    torch.testing.assert_close(out_s.z.to_dense(), out_d.z.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-12, atol=1e-12)
    assert out_s.terms.keys() == out_d.terms.keys()
    for key, value in out_d.terms.items():
        assert out_s.terms[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key
    assert out_s.terms["l1_coefficient"] == pytest.approx(0.3 * min(1.0, step / 10))
    assert g_s.keys() == g_d.keys()
    for name, grad in g_d.items():
        assert grad is not None and g_s[name] is not None, name
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(g_s[name], grad, rtol=1e-10, atol=1e-12, msg=name)
    tied = VARIANTS[variant].get("tied", False)
    assert set(g_d) == {"W_enc", "b_enc", "b_dec", "x"} | (set() if tied else {"W_dec"})


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sparse_path_matches_dense_float32(variant: str) -> None:
    """The same in fp32, to float tolerance; ``loss`` (dense z) and ``loss_with_sparse_code``."""
    sae, dense, x = _pair(torch.float32, density=0.04, **VARIANTS[variant])
    _, g_d = _run(dense, x, 0, sparse_code=False)
    for sparse_code in (False, True):
        sae.zero_grad(set_to_none=True)
        out_s, g_s = _run(sae, x, 0, sparse_code)
        assert out_s.z.is_sparse == sparse_code
        out_d = dense.loss(x)
        torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
        assert out_s.terms["l1"] == pytest.approx(out_d.terms["l1"], rel=1e-6)
        for name, grad in g_d.items():
            scale = grad.abs().max().item()
            torch.testing.assert_close(g_s[name], grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
    fired_s, l0_s = code_stats(out_s.z)
    fired_d, l0_d = code_stats(out_d.z.detach())
    assert l0_s.item() == pytest.approx(l0_d.item())
    assert torch.equal(torch.zeros(D_SAE, dtype=torch.bool).index_fill_(0, fired_s, True), fired_d)


def test_dense_code_falls_back_to_dense_path() -> None:
    """Above SPARSE_MAX_DENSITY the step takes the dense path (a dense z), with the same result."""
    sae, dense, x = _pair(torch.float64, density=0.5)
    assert _density(sae, x) > SPARSE_MAX_DENSITY
    out_s, g_s = _run(sae, x, 0, sparse_code=True)
    out_d, g_d = _run(dense, x, 0, sparse_code=False)
    assert not out_s.z.is_sparse
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-12, atol=1e-12)
    for name, grad in g_d.items():
        torch.testing.assert_close(g_s[name], grad, rtol=1e-10, atol=1e-12, msg=name)


def test_no_latent_fires() -> None:
    """An empty code: x_hat = b_dec and L1 = 0, with the dense path's gradients."""
    sae, dense, x = _pair(torch.float64, density=0)
    out_s, g_s = _run(sae, x, 0, sparse_code=True)
    out_d, g_d = _run(dense, x, 0, sparse_code=False)
    assert out_s.z.is_sparse and out_s.z._nnz() == 0 and out_s.terms["l1"] == 0.0
    torch.testing.assert_close(out_s.loss, out_d.loss)
    for name, grad in g_d.items():
        torch.testing.assert_close(g_s[name], grad, msg=name)


def test_sparse_kernels_leave_inference_and_weights_alone() -> None:
    """The flag is a training detail: inference and the state dict are those of the dense twin."""
    sae, dense, x = _pair(torch.float32, density=0.04)
    torch.testing.assert_close(sae(x), dense(x), rtol=0, atol=0)
    assert sae.state_dict().keys() == dense.state_dict().keys()
