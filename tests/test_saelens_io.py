"""SAELens interoperability: our exports load in SAELens and encode identically, and back.

SAELens takes ~20 s to import, so it is imported once (module-scoped fixture).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.sae.base import SAE
from common.sae.registry import build_sae
from common.sae.saelens_io import (
    EXPORTS,
    INPUT_SCALE_KEY,
    OUR_CONFIG_KEY,
    SAELENS_CONFIG_FILE,
    SAELENS_WEIGHTS_FILE,
    export_saelens,
    import_saelens,
)

D_IN, D_SAE, K = 8, 32, 4
ATOL = 1e-5

# (our architecture, build kwargs); every exportable architecture, tied ReLU separately.
CASES = {
    "relu": ("relu", {}),
    "relu_tied": ("relu", {"tied": True, "l1_coefficient": 0.3}),
    "gated": ("gated", {"l1_coefficient": 0.2}),
    "topk": ("topk", {"k": K}),
    "jumprelu": ("jumprelu", {"bandwidth": 0.01}),
    "batchtopk": ("batchtopk", {"k": K}),
    "matryoshka": ("matryoshka", {"k": K}),
}
# Our architectures exported as the JumpReLU of their inference rule (one scalar threshold).
THRESHOLD_RULES = ("batchtopk", "matryoshka")


@pytest.fixture(scope="module")
def saelens() -> Any:
    return pytest.importorskip("sae_lens", reason="sae_lens is not installed")


def _randomize(sae: SAE, seed: int = 0) -> SAE:
    """Non-trivial weights: random biases, non-unit decoder rows, thresholds in (0.1, 0.8)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name == "r_mag" else 0.5))
        if hasattr(sae, "log_threshold"):
            theta = 0.1 + 0.7 * torch.rand(sae.cfg.d_sae, generator=g)
            sae.log_threshold.copy_(theta.log())
        if sae.name in THRESHOLD_RULES:
            sae.threshold.fill_(0.3)
    return sae.eval()


def _build(case: str, input_scale: float = 1.0) -> SAE:
    arch, kwargs = CASES[case]
    sae = build_sae(arch, d_in=D_IN, d_sae=D_SAE, input_scale=input_scale, **kwargs)
    return _randomize(sae)


def _inputs(seed: int = 1, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D_IN, generator=g) + 0.5


def test_random_weights_exercise_every_branch() -> None:
    """The cases are not trivial: thresholds, gates and the top-k all zero some positive pre."""
    x = _inputs()
    for case in CASES:
        z = _build(case).encode(x)
        assert 0 < (z > 0).float().mean() < 1, case
    jump = _build("jumprelu")
    pre = jump.pre_activations(x)
    assert ((pre > 0) & (pre <= jump.threshold)).any()  # JumpReLU differs from ReLU here
    gated = _build("gated")
    assert ((gated.gate_pre_activations(x) <= 0) & (gated.magnitude_pre_activations(x) > 0)).any()
    topk = _build("topk")
    assert ((topk.pre_activations(x) > 0).sum(1) > K).all()
    assert ((topk.encode(x) > 0).sum(1) == K).all()


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_loads_our_export_and_encodes_identically(
    case: str, tmp_path: Path, saelens: Any
) -> None:
    ours = _build(case)
    path = export_saelens(
        ours,
        tmp_path / case,
        hook_name="blocks.3.hook_resid_post",
        model_name="toy",
        extra_metadata={"context_size": 128},
    )
    theirs = saelens.SAE.load_from_disk(path)
    assert theirs.cfg.architecture() == EXPORTS[ours.name]
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert theirs.cfg.metadata.model_name == "toy"
    assert theirs.cfg.metadata.context_size == 128
    x = _inputs()
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(x), theirs.encode(x)
        torch.testing.assert_close(z_theirs, z_ours, atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs.decode(z_ours), ours.decode(z_ours), atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs(x), ours(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_preserves_state_and_encodings(case: str, tmp_path: Path) -> None:
    ours = _build(case)
    back = import_saelens(export_saelens(ours, tmp_path / case))
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), ours.encode(x), atol=ATOL, rtol=0)
        torch.testing.assert_close(back(x), ours(x), atol=ATOL, rtol=0)
    state, state_back = ours.state_dict(), back.state_dict()
    if case == "relu_tied":  # comes back untied, with W_dec = W_enc^T
        assert back.name == "relu" and not back.cfg.tied
        torch.testing.assert_close(state_back.pop("W_dec"), state["W_enc"].t())
    if case in THRESHOLD_RULES:  # comes back as the JumpReLU of its inference rule
        assert back.name == "jumprelu"
        torch.testing.assert_close(back.threshold, torch.full((D_SAE,), 0.3), atol=1e-6, rtol=0)
        state = {k: v for k, v in state.items() if not k.startswith("threshold")}
        state_back.pop("log_threshold")
    else:
        expected = {**ours.cfg.to_dict(), **({"tied": False} if case == "relu_tied" else {})}
        assert back.name == ours.name and back.cfg.to_dict() == expected
    assert set(state_back) == set(state)
    for name, tensor in state.items():
        torch.testing.assert_close(state_back[name], tensor, atol=1e-6, rtol=1e-6)


# --- the input scale (normalize_activations: true) ------------------------------------------
SCALE = 0.3  # the SAE works on c x with c = 0.3, as after "normalize_activations"
# Raw activations of size ~5-15: float32 rounding of the folded weights is ~1e-6 relative.
SCALED_TOL = {"atol": 1e-4, "rtol": 1e-5}


def _offset_inputs(seed: int = 11, n: int = 256) -> torch.Tensor:
    """Raw activations with an offset, as residual streams have: x = 5 + 3 eps."""
    g = torch.Generator().manual_seed(seed)
    return 5 + 3 * torch.randn(n, D_IN, generator=g)


def _build_scaled(case: str) -> SAE:
    """``case`` with input_scale c and b_dec near the mean of c x (as after training)."""
    sae = _build(case, input_scale=SCALE)
    with torch.no_grad():
        sae.b_dec.add_(SCALE * 5.0)
    return sae


@torch.no_grad()
def _raw(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, x_hat) of raw activations x: z = encode(c x), x_hat = decode(z) / c."""
    z = sae.encode(sae.scale_in(x))
    return z, sae.scale_out(sae.decode(z))


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_reproduces_scaled_sae_on_raw_offset_data(
    case: str, tmp_path: Path, saelens: Any
) -> None:
    """SAELens's encode/decode of the export, on raw x, give our codes and reconstruction."""
    ours = _build_scaled(case)
    theirs = saelens.SAE.load_from_disk(export_saelens(ours, tmp_path / case))
    assert theirs.cfg.normalize_activations == "none"
    x = _offset_inputs()
    z_ours, x_hat_ours = _raw(ours, x)
    assert 0 < (z_ours > 0).float().mean() < 1  # a non-trivial code
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        assert torch.equal(z_theirs > 0, z_ours > 0)
        torch.testing.assert_close(z_theirs, z_ours, **SCALED_TOL)
        torch.testing.assert_close(theirs.decode(z_theirs), x_hat_ours, **SCALED_TOL)
        torch.testing.assert_close(theirs(x), x_hat_ours, **SCALED_TOL)


def test_export_folds_input_scale_into_weights(tmp_path: Path, saelens: Any) -> None:
    """W_enc' = c W_enc, b_dec' = b_dec / c, W_dec' = W_dec / c (rows of norm 1/c for a unit-norm
    decoder), the rest as is; TopK selects on plain pre-activations (SAELens's default too)."""
    from sae_lens.saes.topk_sae import TopKSAEConfig

    ours = build_sae("topk", d_in=D_IN, d_sae=D_SAE, k=K, input_scale=SCALE)
    path = export_saelens(ours, tmp_path)
    w = load_file(str(path / SAELENS_WEIGHTS_FILE))
    cfg = json.loads((path / SAELENS_CONFIG_FILE).read_text())
    assert cfg["normalize_activations"] == "none" and cfg["metadata"][INPUT_SCALE_KEY] == SCALE
    assert cfg["rescale_acts_by_decoder_norm"] is False
    assert TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K).rescale_acts_by_decoder_norm is False
    with torch.no_grad():
        torch.testing.assert_close(w["W_enc"], ours.W_enc * SCALE)
        torch.testing.assert_close(w["W_dec"], ours.W_dec / SCALE)
        torch.testing.assert_close(w["b_dec"], ours.b_dec / SCALE)
        torch.testing.assert_close(w["b_enc"], ours.b_enc)
        torch.testing.assert_close(w["W_dec"].norm(dim=1), torch.full((D_SAE,), 1 / SCALE))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_of_scaled_sae_restores_it(case: str, tmp_path: Path) -> None:
    """Import unfolds the scale: input_scale c, the original weights, the same raw x -> x_hat."""
    ours = _build_scaled(case)
    back = import_saelens(export_saelens(ours, tmp_path / case))
    assert back.cfg.input_scale == SCALE
    x = _offset_inputs()
    (z_ours, x_hat_ours), (z_back, x_hat_back) = _raw(ours, x), _raw(back, x)
    assert torch.equal(z_back > 0, z_ours > 0)
    torch.testing.assert_close(z_back, z_ours, **SCALED_TOL)
    torch.testing.assert_close(x_hat_back, x_hat_ours, **SCALED_TOL)
    for name in ("W_enc", "b_dec", "decoder_directions"):
        torch.testing.assert_close(getattr(back, name), getattr(ours, name), atol=1e-6, rtol=1e-6)


def test_import_after_saelens_folds_stays_exact(tmp_path: Path, saelens: Any) -> None:
    """A scaled export edited in SAELens (TopK selecting on decoder-norm-scaled activations, b_dec
    not subtracted from the input): the SAELens folds come before the unfold of c, so the import
    still encodes and decodes raw x like SAELens."""
    theirs = saelens.SAE.load_from_disk(export_saelens(_build_scaled("topk"), tmp_path / "ours"))
    theirs.cfg.rescale_acts_by_decoder_norm = True
    theirs.cfg.apply_b_dec_to_input = False
    theirs.save_model(tmp_path / "edited")
    back = import_saelens(tmp_path / "edited")
    assert back.cfg.input_scale == SCALE
    x = _offset_inputs()
    z_back, x_hat_back = _raw(back, x)
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        assert 0 < (z_theirs > 0).float().mean() < 1
        torch.testing.assert_close(z_back, z_theirs, **SCALED_TOL)
        torch.testing.assert_close(x_hat_back, theirs(x), **SCALED_TOL)


def test_import_of_export_without_folded_scale(tmp_path: Path) -> None:
    """A folder exported before the fold (weights in the SAE's units, input_scale only in our
    stored config) is read with that input_scale and a warning; a bad recorded scale is refused."""
    ours = _build_scaled("jumprelu")
    unscaled = build_sae("jumprelu", d_in=D_IN, d_sae=D_SAE, **CASES["jumprelu"][1])
    unscaled.load_state_dict(ours.state_dict())
    path = export_saelens(unscaled, tmp_path)
    cfg = json.loads((path / SAELENS_CONFIG_FILE).read_text())
    del cfg["metadata"][INPUT_SCALE_KEY]
    cfg["metadata"][OUR_CONFIG_KEY]["input_scale"] = SCALE  # what the old exporter wrote
    (path / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="before export_saelens folded the input scale"):
        back = import_saelens(path)
    assert back.cfg.input_scale == SCALE
    x = _offset_inputs()
    torch.testing.assert_close(_raw(back, x)[1], _raw(ours, x)[1], **SCALED_TOL)
    cfg["metadata"][INPUT_SCALE_KEY] = 0.0
    (path / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=f"{INPUT_SCALE_KEY} must be a finite number > 0, got 0.0"):
        import_saelens(path)


def _saelens_native(saelens: Any, arch: str) -> Any:
    """A SAELens SAE with the options we fold on import: b_dec not subtracted from the input,
    TopK selecting on decoder-norm-scaled activations, JumpReLU thresholds <= 0."""
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    common = {"d_in": D_IN, "d_sae": D_SAE, "apply_b_dec_to_input": False}
    sae = {
        "standard": lambda: StandardSAE(StandardSAEConfig(**common)),
        "gated": lambda: GatedSAE(GatedSAEConfig(**common)),
        "topk": lambda: TopKSAE(TopKSAEConfig(k=K, rescale_acts_by_decoder_norm=True, **common)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(**common)),
    }[arch]()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name == "r_mag" else 0.5))
        if arch == "jumprelu":  # a third negative, a third zero, a third positive
            sae.threshold.copy_(torch.tensor([-0.2, 0.0, 0.4]).repeat(D_SAE // 3 + 1)[:D_SAE])
    return sae


@pytest.mark.parametrize("arch", ["standard", "gated", "topk", "jumprelu"])
def test_import_of_saelens_saved_folder_matches_saelens(
    arch: str, tmp_path: Path, saelens: Any
) -> None:
    theirs = _saelens_native(saelens, arch)
    theirs.save_model(tmp_path)
    ours = import_saelens(tmp_path)
    assert ours.name == {"standard": "relu"}.get(arch, arch)
    if hasattr(ours.cfg, "unit_norm_decoder"):  # random decoder rows are not unit-norm
        assert ours.cfg.unit_norm_decoder is False
    x = _inputs(seed=5)
    with torch.no_grad():
        z_theirs = theirs.encode(x)
        assert 0 < (z_theirs > 0).float().mean() < 1
        torch.testing.assert_close(ours.encode(x), z_theirs, atol=ATOL, rtol=0)
        torch.testing.assert_close(
            ours.decode(z_theirs), theirs.decode(z_theirs), atol=ATOL, rtol=0
        )
    if arch == "jumprelu":
        # thresholds <= 0 act as a plain ReLU in SAELens: theta = 0, log theta = -inf
        assert torch.equal(torch.isneginf(ours.log_threshold), theirs.threshold <= 0)


def _write_pre6_folder(path: Path, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / SAELENS_WEIGHTS_FILE))
    return path


def _pre6_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shapes = {"W_enc": (D_IN, D_SAE), "b_enc": (D_SAE,), "W_dec": (D_SAE, D_IN), "b_dec": (D_IN,)}
    return {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}


PRE6_CFG = {
    "d_in": D_IN,
    "d_sae": D_SAE,
    "dtype": "float32",
    "hook_point": "blocks.0.hook_resid_pre",
}


def test_pre_6_0_topk_folder_reads_like_saelens(tmp_path: Path, saelens: Any) -> None:
    """Old configs name no architecture; TopK is activation_fn_str='topk' with its k in kwargs."""
    cfg = {**PRE6_CFG, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}
    folder = _write_pre6_folder(tmp_path, cfg, _pre6_weights())
    ours, theirs = import_saelens(folder), saelens.SAE.load_from_disk(folder)
    assert ours.name == theirs.cfg.architecture() == "topk" and ours.cfg.k == K
    x = _inputs(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), atol=ATOL, rtol=0)


def test_pre_6_0_jumprelu_log_threshold_is_read(tmp_path: Path) -> None:
    """Old JumpReLU folders store log_threshold. SAELens 6.54's inference loader rejects them
    (only its training class converts the key), so the reference here is the formula itself:
    z = ReLU(pre) * 1[pre > exp(log_threshold)], pre = W_enc^T (x - b_dec) + b_enc."""
    w = _pre6_weights()
    log_theta = (0.1 + torch.rand(D_SAE, generator=torch.Generator().manual_seed(8))).log()
    folder = _write_pre6_folder(
        tmp_path, {**PRE6_CFG, "architecture": "jumprelu"}, {**w, "log_threshold": log_theta}
    )
    ours = import_saelens(folder)
    x = _inputs(seed=9)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    expected = torch.relu(pre) * (pre > log_theta.exp())
    assert 0 < (expected > 0).float().mean() < (pre > 0).float().mean()  # thresholds matter
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.log_threshold.detach(), log_theta, atol=1e-6, rtol=0)


# --- errors ----------------------------------------------------------------------------------
class _Unsupported(SAE):
    name = "not_exportable"


def test_export_rejects_unsupported_architectures(tmp_path: Path) -> None:
    from common.sae.base import SAEConfig

    with pytest.raises(ValueError, match=r"'not_exportable'.*Supported: relu.*gated.*topk"):
        export_saelens(_Unsupported(SAEConfig(d_in=2, d_sae=3)), tmp_path)
    assert not any(tmp_path.iterdir())


def test_export_rejects_bad_metadata_and_untrained_batchtopk(tmp_path: Path) -> None:
    sae = _build("relu")
    with pytest.raises(ValueError, match="hook_name"):
        export_saelens(sae, tmp_path, extra_metadata={"hook_name": "x"})
    with pytest.raises(ValueError, match=INPUT_SCALE_KEY):
        export_saelens(sae, tmp_path, extra_metadata={INPUT_SCALE_KEY: 2.0})
    with pytest.raises(ValueError, match="JSON"):
        export_saelens(sae, tmp_path, extra_metadata={"obj": object()})
    untrained = _build("batchtopk")
    untrained.threshold.fill_(-1.0)
    with pytest.raises(ValueError, match="threshold"):
        export_saelens(untrained, tmp_path / "btk")
    untrained = _build("matryoshka")
    untrained.threshold.fill_(-1.0)  # "not estimated yet": eval mode falls back to BatchTopK
    with pytest.raises(ValueError, match=r"matryoshka SAE with inference threshold -1\.0"):
        export_saelens(untrained, tmp_path / "matryoshka")


def test_export_records_our_config(tmp_path: Path) -> None:
    sae = _build("topk")
    cfg = json.loads((export_saelens(sae, tmp_path) / SAELENS_CONFIG_FILE).read_text())
    assert cfg["k"] == K and cfg["architecture"] == "topk"
    assert cfg["metadata"][OUR_CONFIG_KEY] == {"architecture": "topk", **sae.cfg.to_dict()}
    assert set(load_file(str(tmp_path / SAELENS_WEIGHTS_FILE))) == {
        "W_enc",
        "b_enc",
        "W_dec",
        "b_dec",
    }


def test_import_missing_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        import_saelens(tmp_path / "nowhere")
    ours = _build("relu").save(tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match=r"missing cfg\.json.*SAE\.load"):
        import_saelens(ours)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / SAELENS_CONFIG_FILE).write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE}))
    (pickled / "sae_weights.pt").write_bytes(b"not a real pickle: must never be opened")
    with pytest.raises(FileNotFoundError, match=r"sae_weights\.safetensors.*safetensors"):
        import_saelens(pickled)


def _edit_cfg(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / SAELENS_CONFIG_FILE).read_text())
    cfg.update(changes)
    (path / SAELENS_CONFIG_FILE).write_text(json.dumps(cfg))


def test_import_rejects_what_it_cannot_match(tmp_path: Path) -> None:
    path = export_saelens(_build("relu"), tmp_path / "sae")
    _edit_cfg(path, architecture="transcoder")
    with pytest.raises(ValueError, match=r"'transcoder'.*Supported: 'standard'.*'jumprelu'"):
        import_saelens(path)
    _edit_cfg(path, architecture="standard", normalize_activations="layer_norm")
    with pytest.raises(ValueError, match="layer_norm"):
        import_saelens(path)
    _edit_cfg(path, normalize_activations="expected_average_only_in")
    with pytest.warns(UserWarning, match="expected_average_only_in"):
        assert import_saelens(path).name == "relu"
    _edit_cfg(path, normalize_activations="none", d_in=D_IN + 1)
    with pytest.raises(ValueError, match=r"tensor W_(enc|dec) has shape.*for d_in=9"):
        import_saelens(path)
    _edit_cfg(path, d_in=D_IN, architecture="gated")
    with pytest.raises(ValueError, match=r"missing tensors \['b_gate', 'b_mag', 'r_mag'\]"):
        import_saelens(path)
