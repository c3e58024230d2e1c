"""TopK (paper 7) and BatchTopK (paper 22's base) SAEs, and the sparse kernels that train them.

Toy training runs are small (8k samples, a few hundred steps of 256) and cached per module.
"""

from __future__ import annotations

import copy
import tempfile
from functools import cache

import pytest
import torch
from torch import Tensor
from torch.autograd import gradcheck

from common import toy
from common.evals.ground_truth import random_dictionary_baseline, recovery_metrics
from common.sae import SAE, TrainContext, available_architectures, build_sae, sparse_ops
from common.sae.base import code_stats, fvu, remove_parallel_grad_
from common.sae.sparse_ops import selected_preacts, sparse_decode, topk_preacts
from common.train import TensorBatches, TrainConfig, train

BATCH = 256


@cache
def _superposition(n_features: int = 64, d: int = 32, p_active: float = 0.05) -> toy.ToyData:
    return toy.superposition(n_samples=8000, n_features=n_features, d=d, p_active=p_active, seed=0)


def _train(
    data: toy.ToyData, arch: str, steps: int, dead_after_tokens: int = 1_000_000, **sae
) -> SAE:
    cfg = TrainConfig(
        architecture=arch,
        sae=sae,
        steps=steps,
        batch_size=BATCH,
        lr=3e-3,
        checkpoint_every=steps,
        log_every=steps,
        dead_after_tokens=dead_after_tokens,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: a second thread only contends on a shared CPU
    try:
        with tempfile.TemporaryDirectory() as out:
            return train(cfg, TensorBatches(data.x, BATCH, seed=0), out, progress=False)
    finally:
        torch.set_num_threads(threads)


@cache
def _fit(arch: str, **sae) -> tuple[SAE, dict[str, float]]:
    """Train on the default superposition toy (64 features in d=32, L0 ~ 3.2); eval-mode metrics."""
    data = _superposition()
    sae_ = _train(data, arch, steps=600, d_sae=128, **sae)
    with torch.no_grad():
        z = sae_.encode(data.x)
        x_hat = sae_.decode(z)
    metrics = {"fvu": fvu(data.x, x_hat).item(), "l0": (z > 0).float().sum(1).mean().item()}
    return sae_, {**metrics, **recovery_metrics(data.features, sae_.decoder_directions)}


# --- configuration -------------------------------------------------------------------------------
def test_registered() -> None:
    assert {"topk", "batchtopk"} <= set(available_architectures())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("k", [0, -3, 65, 2.5])
def test_bad_k_names_the_field(arch: str, k: object) -> None:
    with pytest.raises(ValueError, match="`k`"):
        build_sae(arch, d_in=8, d_sae=64, k=k)


def test_bad_aux_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="`k_aux`"):
        build_sae("topk", d_in=8, d_sae=64, k=4, k_aux=0)
    with pytest.raises(ValueError, match="`aux_coefficient`"):
        build_sae("topk", d_in=8, d_sae=64, k=4, aux_coefficient=-1.0)
    with pytest.raises(ValueError, match="`threshold_lr`"):
        build_sae("batchtopk", d_in=8, d_sae=64, k=4, threshold_lr=0.0)


def test_defaults_and_saelens_layout() -> None:
    sae = build_sae("topk", d_in=10, d_sae=40, k=4)
    assert sae.cfg.k_aux == 5 and sae.cfg.aux_coefficient == pytest.approx(1 / 32)
    shapes = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    assert shapes == {"W_enc": (10, 40), "b_enc": (40,), "W_dec": (40, 10), "b_dec": (10,)}
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(40))
    assert torch.equal(sae.W_enc, sae.W_dec.t())  # tied init
    untied = build_sae("topk", d_in=10, d_sae=40, k=4, tied_init=False)
    assert not torch.allclose(untied.W_enc, untied.W_dec.t())


# --- sparse kernels ------------------------------------------------------------------------------
def _entries(n: int, m: int, k: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    cols = torch.stack([torch.randperm(m, generator=g)[:k] for _ in range(n)]).flatten()
    return torch.arange(n).repeat_interleave(k), cols


def _double(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_sparse_decode() -> None:
    torch.manual_seed(0)
    n, m, d = 5, 9, 4
    W_dec = _double(m, d)
    rows, cols = _entries(n, m, 3)
    assert gradcheck(
        lambda v, w: sparse_decode(v, rows, cols, w, n), (_double(rows.numel()), W_dec)
    )
    # A variable number of entries per row, with empty rows (BatchTopK codes).
    rows, cols = torch.tensor([0, 0, 2, 2, 2, 4]), torch.tensor([1, 3, 0, 1, 8, 1])
    assert gradcheck(lambda v, w: sparse_decode(v, rows, cols, w, n), (_double(6), W_dec))


def test_gradcheck_selected_preacts() -> None:
    torch.manual_seed(0)
    n, m, d = 5, 9, 4
    x, W_enc, b_enc, b_dec = _double(n, d), _double(d, m), _double(m), _double(d)
    rows, cols = _entries(n, m, 3)

    def given_values(x: Tensor, w: Tensor, be: Tensor, bd: Tensor) -> Tensor:
        pre = ((x - bd) @ w + be).detach()  # the caller's dense, gradient-free pre-activations
        return selected_preacts(x, w, be, bd, rows, cols, pre[rows, cols])

    def computed_values(x: Tensor, w: Tensor, be: Tensor, bd: Tensor) -> Tensor:
        return selected_preacts(x, w, be, bd, rows, cols)

    assert gradcheck(given_values, (x, W_enc, b_enc, b_dec))
    assert gradcheck(computed_values, (x, W_enc, b_enc, b_dec))


def test_chunked_topk_preacts_match_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sparse_ops, "_MAX_PRE_BYTES", 16 * 200 * 4)  # 16 rows per block
    torch.manual_seed(0)
    n, d, m, k = 70, 8, 200, 5
    x, W_enc, b_enc, b_dec = torch.randn(n, d), torch.randn(d, m), torch.randn(m), torch.randn(d)
    dead = torch.tensor([3, 50, 51, 120, 199, 7])
    vals, idx, aux_vals, aux_idx = topk_preacts(x, W_enc, b_enc, b_dec, k, dead, k_aux=4)
    pre = (x - b_dec) @ W_enc + b_enc
    assert torch.allclose(vals.sort(1).values, pre.topk(k).values.sort(1).values, atol=1e-5)
    assert torch.allclose(vals, pre.gather(1, idx), atol=1e-5)
    masked = torch.full_like(pre, -torch.inf)
    masked[:, dead] = pre[:, dead]
    assert aux_vals is not None and aux_idx is not None
    assert torch.allclose(aux_vals.sort(1).values, masked.topk(4).values.sort(1).values, atol=1e-5)
    assert bool(torch.isin(aux_idx, dead).all())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("with_aux", [False, True])
def test_sparse_backward_matches_dense_autograd(arch: str, with_aux: bool) -> None:
    """Every parameter's gradient through the sparse encoder/decoder backward (no dense B x M
    matmul after the forward one) equals dense autograd's to ~1e-5 relative, with and without
    AuxK."""
    torch.manual_seed(1)
    sae = build_sae(arch, d_in=24, d_sae=192, k=6)
    x = torch.randn(128, 24) * 2 + 1
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    dense = copy.deepcopy(sae)
    dense.cfg.sparse_kernels = False
    dead = None
    if with_aux:
        dead = torch.zeros(192, dtype=torch.bool)
        dead[1::4] = True
    for model in (sae, dense):
        model.loss(x, TrainContext(dead_mask=dead)).loss.backward()
    for (name, p), q in zip(sae.named_parameters(), dense.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None, name
        assert p.grad.abs().max() > 0, name
        rel = (p.grad - q.grad).norm() / q.grad.norm()
        assert rel < 1e-5, (name, rel.item())


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_kernels_match_dense_reference(arch: str) -> None:
    """Same loss and gradients, AuxK included, through the sparse kernels and the dense path."""
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=16, d_sae=96, k=4)
    x = torch.randn(64, 16) * 2 + 1
    sae.init_from_data(x)
    with torch.no_grad():
        sae.b_enc.normal_()  # break the symmetry of the init
    dense = copy.deepcopy(sae)
    dense.cfg.sparse_kernels = False
    dead = torch.zeros(96, dtype=torch.bool)
    dead[::3] = True
    outs = []
    for model in (sae, dense):
        out = model.loss(x, TrainContext(dead_mask=dead))
        out.loss.backward()
        outs.append(out)
    assert outs[0].terms["aux"] > 0
    assert outs[0].loss.item() == pytest.approx(outs[1].loss.item(), rel=1e-5)
    assert torch.allclose(outs[0].z, outs[1].z.detach(), atol=1e-5)
    for (name, p), q in zip(sae.named_parameters(), dense.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    # AuxK only reaches dead latents: live columns of W_dec get gradient from the main loss only.
    main_only = copy.deepcopy(dense)
    main_only.zero_grad()
    main_only.loss(x, TrainContext()).loss.backward()
    assert main_only.W_dec.grad is not None and dense.W_dec.grad is not None
    live = ~dead
    assert torch.allclose(main_only.W_dec.grad[live], dense.W_dec.grad[live], atol=1e-6)
    assert not torch.allclose(main_only.W_dec.grad[dead], dense.W_dec.grad[dead])


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_sparse_code_output_matches_dense(arch: str) -> None:
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=16, d_sae=96, k=4)
    x = torch.randn(64, 16)
    sae.init_from_data(x)
    twin = copy.deepcopy(sae)
    dense, sparse = sae.loss(x), twin.loss_with_sparse_code(x)
    assert sparse.z.is_sparse and sparse.z.shape == dense.z.shape
    assert torch.allclose(sparse.z.to_dense(), dense.z.detach())
    assert sparse.loss.item() == pytest.approx(dense.loss.item())
    # what the trainer reads from either code: the latents that fired, and L0
    (fired_dense, l0_dense), (fired_sparse, l0_sparse) = code_stats(dense.z), code_stats(sparse.z)
    mask = torch.zeros(96, dtype=torch.bool)
    mask[fired_sparse] = True
    assert torch.equal(mask, fired_dense) and 0 < mask.sum() < 96
    assert l0_sparse.item() == pytest.approx(l0_dense.item())
    assert l0_dense.item() == pytest.approx((dense.z > 0).float().sum(1).mean().item())


def test_init_scale_fits_the_first_reconstruction() -> None:
    data = _superposition()
    scaled = build_sae("topk", d_in=32, d_sae=128, k=4)
    raw = build_sae("topk", d_in=32, d_sae=128, k=4, init_scale=False)
    scaled.init_from_data(data.x)
    raw.init_from_data(data.x)
    with torch.no_grad():
        fvu_scaled, fvu_raw = fvu(data.x, scaled(data.x)).item(), fvu(data.x, raw(data.x)).item()
    assert fvu_scaled < min(1.0, fvu_raw)
    assert torch.equal(
        scaled.encode(data.x) > 0, raw.encode(data.x) > 0
    )  # the selection is unchanged


def test_decoder_rows_stay_unit_norm() -> None:
    sae = build_sae("topk", d_in=16, d_sae=64, k=4)
    x = torch.randn(128, 16)
    sae.init_from_data(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    sae.loss(x).loss.backward()
    sae.before_step()
    assert sae.W_dec.grad is not None
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5  # tangent to the sphere
    opt.step()
    assert (sae.W_dec.norm(dim=1) - 1).abs().max() > 1e-4  # the step leaves the sphere ...
    sae.after_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(64), atol=1e-6)  # ... and is put back


def test_tangent_gradient_matches_the_projection_formula() -> None:
    """g_i - <g_i, u_i> u_i with u_i = w_i / ||w_i||, on rows of any norm."""
    w = torch.nn.Parameter(torch.randn(40, 12) * torch.rand(40, 1) * 3)
    w.grad = torch.randn(40, 12)
    unit = w.detach() / w.detach().norm(dim=1, keepdim=True)
    expected = w.grad - (w.grad * unit).sum(1, keepdim=True) * unit
    remove_parallel_grad_(w)
    assert torch.allclose(w.grad, expected, atol=1e-6)


# --- persistence ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_save_load_round_trip(arch: str, tmp_path) -> None:
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=12, d_sae=48, k=3, aux_coefficient=0.5)
    x = torch.randn(200, 12)
    sae.init_from_data(x)
    for _ in range(3):
        sae.loss(x).loss.backward()  # BatchTopK: moves the threshold
    sae.eval()
    loaded = SAE.load(sae.save(tmp_path / arch)).eval()
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    for key, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if arch == "batchtopk":
        assert loaded.threshold.item() > 0
    with torch.no_grad():
        assert torch.equal(loaded(x), sae(x))


# --- training on toy data ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_toy_ground_truth_recovery(arch: str) -> None:
    data = _superposition()
    _, metrics = _fit(arch, k=4)
    baseline = random_dictionary_baseline(data.features, 128)
    assert metrics["mmcs"] > baseline["mmcs"] + 0.4, (metrics, baseline)
    assert metrics["recovered_0.9"] >= 0.9, metrics
    assert metrics["fvu"] < 0.2, metrics


def test_batchtopk_inference_threshold_gives_l0_near_k() -> None:
    sae, metrics = _fit("batchtopk", k=4)
    assert not sae.training and sae.threshold.item() > 0
    assert 0.7 * 4 <= metrics["l0"] <= 1.3 * 4, metrics
    x = _superposition().x[:BATCH]
    sae.train()
    with torch.no_grad():
        z_train = sae.encode(x)
    sae.eval()
    assert (z_train > 0).sum().item() == 4 * BATCH  # training mode keeps exactly B*k activations


def test_topk_beats_relu_at_equal_l0() -> None:
    """ReLU+L1 with *more* active latents than TopK still reconstructs worse (shrinkage)."""
    _, topk = _fit("topk", k=4)
    _, relu = _fit("relu", l1_coefficient=1.0)
    assert relu["l0"] >= topk["l0"], (relu, topk)  # the comparison favours ReLU on sparsity
    assert topk["fvu"] < 0.75 * relu["fvu"], (topk, relu)


def test_auxk_revives_dead_latents() -> None:
    """As many latents as features and an untied init leave most latents dead after 50 steps;
    AuxK (Gao et al., App. A.2) brings a part of them back and lowers the FVU."""
    data = _superposition(n_features=512, d=32, p_active=4 / 512)
    results = {}
    for coefficient in (0.0, 1 / 32):
        sae = _train(
            data,
            "topk",
            steps=600,
            dead_after_tokens=50 * BATCH,
            d_sae=512,
            k=4,
            tied_init=False,
            aux_coefficient=coefficient,
        )
        with torch.no_grad():
            z = sae.encode(data.x)
            results[coefficient] = {
                "dead": ((z > 0).sum(0) == 0).float().mean().item(),
                "fvu": fvu(data.x, sae.decode(z)).item(),
            }
    without, with_aux = results[0.0], results[1 / 32]
    assert without["dead"] > 0.3, results  # the setting does create dead latents
    assert with_aux["dead"] < without["dead"] - 0.05, results
    assert with_aux["fvu"] < without["fvu"], results
