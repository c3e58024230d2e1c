"""Bad SAE folders and mismatched data give clear errors, not tracebacks from inside torch.

``SAE.load`` checks config.json and the safetensors header before it allocates the model; the
evaluation command line names the SAE's d_in, the data's width and the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.evals.evaluate import main as evals_main
from common.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE
from common.sae.registry import available_architectures, build_sae, get_architecture

D_IN, D_SAE, HUGE = 8, 32, 30_000_000  # HUGE: 4 x 0.96 GB fp32 (8, 3e7) blocks if built


def _saved(tmp_path: Path, arch: str = "relu", **kwargs: Any) -> Path:
    return build_sae(arch, d_in=D_IN, d_sae=D_SAE, **kwargs).save(tmp_path / "sae")


def _edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, **changes}))


# --- SAE.load ----------------------------------------------------------------------------------
def test_huge_config_fails_on_the_shapes_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config saying d_sae=3e7 next to (8, 32) weights: the mismatch is reported from the
    safetensors header; the model is only ever built on the meta device (no memory)."""
    folder = _saved(tmp_path)
    _edit_config(folder, d_sae=HUGE)
    cls = get_architecture("relu")
    original, devices = cls.__init__, []

    def guarded(self: SAE, cfg: Any) -> None:
        if cfg.d_sae == HUGE:
            devices.append(torch.empty(0).device.type)
            assert devices[-1] == "meta", "SAE.load allocated the huge model before checking"
        original(self, cfg)

    monkeypatch.setattr(cls, "__init__", guarded)
    pattern = (
        rf"sae\.safetensors does not match .*config\.json: tensor W_enc has shape \(8, 32\) in the "
        rf"file, the config implies \(8, {HUGE}\).*Retrain or re-export this SAE"
    )
    with pytest.raises(ValueError, match=pattern):
        SAE.load(folder)
    assert devices == ["meta"]


def test_missing_and_extra_tensors(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    state = load_file(str(folder / WEIGHTS_FILE))
    save_file({k: v for k, v in state.items() if k != "b_enc"}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"missing tensors \['b_enc'\]\. Retrain or re-export"):
        SAE.load(folder)
    save_file({**state, "extra": torch.zeros(3)}, str(folder / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra'\]"):
        SAE.load(folder)


def test_missing_files(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"No SAE checkpoint .*missing sae\.safetensors"):
        SAE.load(folder)
    with pytest.raises(FileNotFoundError, match=r"missing config\.json"):
        SAE.load(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "content",
    [b"", b"not a safetensors file at all", b'{"W_enc": 1}', "truncated"],
    ids=["empty", "text", "json", "truncated"],
)
def test_unreadable_weights(tmp_path: Path, content: bytes | str) -> None:
    folder = _saved(tmp_path)
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 40] if content == "truncated" else content)
    pattern = r"sae\.safetensors is not a readable safetensors file .*truncated or in another"
    with pytest.raises(ValueError, match=pattern):
        SAE.load(folder)


def test_bad_config_json(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    (folder / CONFIG_FILE).write_text('{"architecture": "relu", "d_in": 8,')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*Retrain or re-export"):
        SAE.load(folder)
    (folder / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object.*got a list"):
        SAE.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"architecture": "relu", "d_in": 8}))
    with pytest.raises(ValueError, match=r"config\.json: .*d_sae"):
        SAE.load(folder)
    (folder / CONFIG_FILE).write_text(json.dumps({"architecture": "relu", "d_in": 8, "d_sae": -1}))
    with pytest.raises(ValueError, match=r"config\.json: SAE config: `d_sae` must be a positive"):
        SAE.load(folder)


# Minimal hyperparameters per architecture where the defaults need a larger d_sae.
_KWARGS = {"msae": {"ks": [2, 4]}, "switch": {"k": 4}}


@pytest.mark.parametrize("arch", available_architectures())
def test_every_architecture_loads_and_is_checked_on_meta(arch: str, tmp_path: Path) -> None:
    """The meta-device check accepts every architecture's own save (no false alarm) and is
    really used for it (no fall-back to building first)."""
    from common.sae.base import _expected_shapes

    sae = build_sae(arch, d_in=D_IN, d_sae=D_SAE, **_KWARGS.get(arch, {}))
    folder = sae.save(tmp_path / arch)
    config = json.loads((folder / CONFIG_FILE).read_text())
    config.pop("architecture")
    assert _expected_shapes(arch, config, folder / CONFIG_FILE) is not None
    loaded = SAE.load(folder)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# --- python -m common.evals ----------------------------------------------------------------
def test_evals_cli_reports_a_width_mismatch(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = tmp_path / "acts.safetensors"
    save_file({"activations": torch.randn(16, D_IN - 2)}, str(data))
    argv = ["--sae", str(folder), "--data", str(data), "--out", str(tmp_path / "m.json")]
    pattern = (
        rf"^error: {data}: the activations have width 6 \(shape \(16, 6\)\), but the relu SAE has "
        r"d_in=8\. Did you pass the activations of the site the SAE was trained on"
    )
    with pytest.raises(SystemExit, match=pattern):
        evals_main(argv)
    assert not (tmp_path / "m.json").exists()


def test_evals_cli_reports_mismatched_true_features(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    data = tmp_path / "toy.safetensors"
    save_file({"x": torch.randn(16, D_IN), "features": torch.randn(5, D_IN + 1)}, str(data))
    argv = ["--sae", str(folder), "--data", str(data), "--key", "x"]
    argv += ["--features-key", "features", "--out", str(tmp_path / "m.json")]
    with pytest.raises(SystemExit, match=r"^error: .*true features have shape \(5, 9\).*d_in=8"):
        evals_main(argv)


def test_evals_cli_reports_a_bad_sae_folder(tmp_path: Path) -> None:
    folder = _saved(tmp_path)
    _edit_config(folder, d_in=D_IN + 1)
    data = tmp_path / "acts.safetensors"
    save_file({"activations": torch.randn(16, D_IN)}, str(data))
    argv = ["--sae", str(folder), "--data", str(data), "--out", str(tmp_path / "m.json")]
    with pytest.raises(SystemExit, match=r"^error: .*sae\.safetensors does not match .*W_enc"):
        evals_main(argv)
