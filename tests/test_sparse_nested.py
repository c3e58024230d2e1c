"""The sparse training paths of BatchTopK, Matryoshka (paper 22) and MSAE (paper 28).

``sparse_kernels=True`` selects the code once from the dense pre-activations (``batch_topk_entries``
or one per-token TopK_{k_h}) and computes every prefix's reconstruction from the selected entries
(``nested_decode``); the loss, its terms, the code, the inference threshold and every gradient must
equal those of the dense path (``sparse_kernels=False``), with and without AuxK.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from common.sae import SAE, TrainContext, build_sae
from common.sae.base import code_stats
from common.sae.sparse_ops import batch_topk_entries, grouped_decode, prefix_mse

D_IN, D_SAE, N = 24, 192, 128

VARIANTS = {
    "batchtopk": ("batchtopk", {"k": 6}),
    "matryoshka_sum": ("matryoshka", {"k": 6}),
    "matryoshka_mean": ("matryoshka", {"k": 6, "prefixes": [20, 64, 192], "prefix_loss": "mean"}),
    "msae": ("msae", {"ks": [2, 5, 8], "alphas": [1.0, 0.5, 2.0], "aux_coefficient": 0.1}),
    "msae_no_aux_coefficient": ("msae", {"ks": [3, 8]}),
}


def _pair(arch: str, hyper: dict, dtype: torch.dtype = torch.float64) -> tuple[SAE, SAE, Tensor]:
    """An SAE with perturbed weights and biases, its dense twin, and a batch."""
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=D_IN, d_sae=D_SAE, **hyper).to(dtype)
    x = (torch.randn(N, D_IN) * 2 + 1).to(dtype)
    sae.init_from_data(x)
    with torch.no_grad():
        for p in sae.parameters():  # nonzero biases, untied encoder: every term matters
            p.add_(0.1 * torch.randn_like(p))
    dense = copy.deepcopy(sae)
    dense.cfg.sparse_kernels = False  # type: ignore[attr-defined]
    return sae, dense, x


def _run(sae: SAE, x: Tensor, dead: Tensor | None, sparse_code: bool):
    """Loss output and the gradients of every parameter and of x."""
    x = x.clone().requires_grad_(True)
    fn = sae.loss_with_sparse_code if sparse_code else sae.loss
    out = fn(x, TrainContext(dead_mask=dead))
    out.loss.backward()
    return out, {**{name: p.grad for name, p in sae.named_parameters()}, "x": x.grad}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_path_matches_dense_float64(variant: str, with_aux: bool) -> None:
    """Loss, terms, x_hat, z, the threshold and all gradients (W_enc, W_dec, b_enc, b_dec, x)."""
    arch, hyper = VARIANTS[variant]
    sae, dense, x = _pair(arch, hyper)
    dead = None
    if with_aux:
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[1::4] = True
    out_s, g_s = _run(sae, x, dead, sparse_code=True)
    out_d, g_d = _run(dense, x, dead, sparse_code=False)
    assert out_s.z.is_sparse and not out_d.z.is_sparse  # the sparse path was taken
    tight = {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(out_s.z.to_dense(), out_d.z.detach(), **tight)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, **tight)
    torch.testing.assert_close(out_s.loss, out_d.loss, **tight)
    assert out_s.terms.keys() == out_d.terms.keys()
    for key, value in out_d.terms.items():
        assert out_s.terms[key] == pytest.approx(value, rel=1e-10, abs=1e-10), key
    aux_key = "aux" if arch == "batchtopk" else "auxk"
    assert (out_d.terms.get(aux_key, 0.0) > 0) == with_aux
    for name, grad in g_d.items():
        assert grad is not None and g_s[name] is not None, name
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(g_s[name], grad, **tight, msg=name)
    for name, buffer in dense.named_buffers():  # BatchTopK's and Matryoshka's threshold
        torch.testing.assert_close(dict(sae.named_buffers())[name], buffer, **tight)
    fired_s, l0_s = code_stats(out_s.z)
    fired_d, l0_d = code_stats(out_d.z)
    assert set(fired_s.tolist()) == set(fired_d.nonzero().squeeze(1).tolist())
    assert l0_s.item() == pytest.approx(l0_d.item())


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka_sum", "msae"])
def test_sparse_path_matches_dense_float32(variant: str) -> None:
    """The same in float32, at float32 tolerance, with AuxK."""
    arch, hyper = VARIANTS[variant]
    sae, dense, x = _pair(arch, hyper, torch.float32)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True
    out_s, g_s = _run(sae, x, dead, sparse_code=True)
    out_d, g_d = _run(dense, x, dead, sparse_code=False)
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_s.x_hat, out_d.x_hat, rtol=1e-5, atol=1e-5)
    for name, grad in g_d.items():
        torch.testing.assert_close(g_s[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "arch, hyper", [("batchtopk", {"k": 24}), ("matryoshka", {"k": 24}), ("msae", {"ks": [4, 24]})]
)
def test_dense_code_falls_back_to_the_dense_path(arch: str, hyper: dict) -> None:
    """k / d_sae above ``SPARSE_MAX_DENSITY``: the step takes the dense path (a dense z)."""
    sae, dense, x = _pair(arch, hyper)
    out_s, out_d = sae.loss_with_sparse_code(x), dense.loss(x)
    if arch != "batchtopk":  # BatchTopK converts its dense code, as TopK's dense path does
        assert not out_s.z.is_sparse
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["batchtopk", "matryoshka_sum", "msae"])
def test_inference_and_weights_unchanged(variant: str) -> None:
    arch, hyper = VARIANTS[variant]
    sae, dense, x = _pair(arch, hyper)
    assert sae.state_dict().keys() == dense.state_dict().keys()
    for model in (sae, dense):
        model.eval()
    torch.testing.assert_close(sae.encode(x), dense.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(sae(x), dense(x), rtol=0, atol=0)


# --- the kernels --------------------------------------------------------------------------------
def _reference_entries(pre: Tensor, n_keep: int) -> set[tuple[int, int]]:
    flat = pre.flatten().topk(n_keep).indices
    return {(int(i) // pre.shape[1], int(i) % pre.shape[1]) for i in flat}


@pytest.mark.parametrize("shape, k", [((512, 3000), 8), ((300, 670), 3), ((64, 96), 4)])
def test_batch_topk_entries_is_exact(shape: tuple[int, int], k: int) -> None:
    """The n_keep largest entries, row-major, through the sampled bound (a d_sae that the first
    sampling stride divides in the second case) or over all entries (small inputs)."""
    torch.manual_seed(0)
    pre = torch.randn(*shape) + torch.randn(shape[1])  # per-latent offsets, like b_enc
    rows, cols, vals = batch_topk_entries(pre, k * shape[0])
    assert rows.numel() == k * shape[0]
    assert bool((rows[1:] >= rows[:-1]).all())
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == _reference_entries(
        pre, rows.numel()
    )
    torch.testing.assert_close(vals, pre[rows, cols], rtol=0, atol=0)


def test_batch_topk_entries_misjudged_sample_and_ties() -> None:
    """A sample that sees only the largest values (fewer candidates than n_keep) falls back to
    all entries; ties at the threshold are broken to keep exactly n_keep entries."""
    pre = torch.zeros(200, 1000)
    pre.view(-1)[::67] = 10.0  # exactly what the strided sample reads
    rows, cols, vals = batch_topk_entries(pre, 5000)
    assert rows.numel() == 5000
    assert int((vals == 10.0).sum()) == pre.view(-1)[::67].numel()
    assert bool((rows[1:] >= rows[:-1]).all()) and bool((vals >= 0).all())


@pytest.mark.parametrize("needs_target_grad", [False, True])
def test_grouped_decode_and_prefix_mse_match_dense_prefixes(needs_target_grad: bool) -> None:
    """mse_g = ||target - (the entries of groups <= g, decoded)||^2 / N: values, the last
    residual and the gradients of the entries, W_dec and the target."""
    torch.manual_seed(0)
    n, m, d = 16, 40, 8
    z = torch.randn(n, m, dtype=torch.float64) * (torch.rand(n, m) < 0.2)
    bounds = torch.tensor([10, 25, 40])
    rows, cols = z.nonzero(as_tuple=True)
    W = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    target = torch.randn(n, d, dtype=torch.float64, requires_grad=needs_target_grad)
    vals = z[rows, cols].clone().requires_grad_(True)
    groups = torch.bucketize(cols, bounds, right=True)
    parts = grouped_decode(vals, rows, cols, groups, len(bounds), W, n)
    mses, residual = prefix_mse(target, parts)
    zd = z.clone().requires_grad_(True)
    recons = [zd[:, :b] @ W[:b] for b in bounds.tolist()]
    ref = torch.stack([(target - r).pow(2).sum(-1).mean() for r in recons])
    torch.testing.assert_close(mses, ref.detach())
    torch.testing.assert_close(residual, (target - recons[-1]).detach())
    weights = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    inputs = (vals, W, target) if needs_target_grad else (vals, W)
    got = torch.autograd.grad((weights * mses).sum(), inputs)
    want = torch.autograd.grad((weights * ref).sum(), (zd, *inputs[1:]))
    torch.testing.assert_close(got[0], want[0][rows, cols])
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g, w)
