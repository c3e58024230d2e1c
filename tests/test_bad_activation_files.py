"""Empty, truncated and malformed activation files: a ValueError naming the file and the fix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from common.activations.files import load_activation_file, load_activations

X = torch.arange(40, dtype=torch.float32).reshape(10, 4)


def _npy(path: Path) -> bytes:
    np.save(path, X.numpy())
    return path.read_bytes()


def _safetensors(path: Path) -> bytes:
    save_file({"activations": X}, str(path))
    return path.read_bytes()


NPY_FIX = r"Re-create it with numpy\.save"
ST_FIX = r"Re-create it with safetensors\.torch\.save_file"

# (suffix, damage to the good file's bytes, expected message)
CASES: list[tuple[str, Callable[[bytes], bytes], str]] = [
    (".npy", lambda raw: b"", rf"is empty \(0 bytes\)\. {NPY_FIX}"),
    (".npy", lambda raw: raw[:-7], rf"is truncated: expected 288 bytes .*found 281\. {NPY_FIX}"),
    (".npy", lambda raw: raw[:50], rf"truncated or damaged \.npy header .*{NPY_FIX}"),
    (".npy", lambda raw: b"hello world" * 10, rf"is not a \.npy file .*{NPY_FIX}"),
    (".safetensors", lambda raw: b"", rf"is empty \(0 bytes\)\. {ST_FIX}"),
    (".safetensors", lambda raw: raw[:5], rf"expected at least 8 bytes .*found 5\. {ST_FIX}"),
    (".safetensors", lambda raw: raw[:20], rf"expected at least \d+ bytes .*found 20\. {ST_FIX}"),
    (".safetensors", lambda raw: raw[:-7], rf"truncated: expected \d+ bytes, found \d+\. {ST_FIX}"),
    (".safetensors", lambda raw: b"hello world" * 10, rf"is not a safetensors file .*{ST_FIX}"),
    (".safetensors", lambda raw: raw[:8] + b"x" * (len(raw) - 8), "is not a safetensors file"),
]


@pytest.mark.parametrize(("suffix", "damage", "match"), CASES)
def test_damaged_file_is_a_clear_value_error(
    tmp_path: Path, suffix: str, damage: Callable[[bytes], bytes], match: str
) -> None:
    path = tmp_path / f"acts{suffix}"
    raw = _npy(path) if suffix == ".npy" else _safetensors(path)
    path.write_bytes(damage(raw))
    for load in (load_activation_file, load_activations):
        with pytest.raises(ValueError, match=rf"activation file {path} .*{match}"):
            load(path)


def test_good_files_still_load_bitwise(tmp_path: Path) -> None:
    _npy(tmp_path / "a.npy")
    _safetensors(tmp_path / "a.safetensors")
    with open(tmp_path / "two.npy", "wb") as f:  # a second array appended: trailing bytes are fine
        np.save(f, X.numpy())
        np.save(f, X.numpy())
    for name in ("a.npy", "a.safetensors", "two.npy"):
        assert torch.equal(load_activation_file(tmp_path / name), X)
    assert torch.equal(load_activations(tmp_path / "a.npy", max_tokens=3), X[:3])


def test_object_npy_is_never_unpickled(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match=r"holds Python objects \(dtype object\).*numpy\.save"):
        load_activation_file(tmp_path / "obj.npy")


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_train_cli_reports_a_truncated_file(tmp_path: Path, suffix: str) -> None:
    from common.train import main

    path = tmp_path / f"acts{suffix}"
    raw = _npy(path) if suffix == ".npy" else _safetensors(path)
    path.write_bytes(raw[:-7])
    argv = ["--data", str(path), "--arch", "relu", "--set", "d_sae=8", "--steps", "2"]
    with pytest.raises(SystemExit, match=rf"^error: activation file {path} is truncated"):
        main([*argv, "--out", str(tmp_path / "run"), "--quiet"])


def test_extract_cli_refuses_a_missing_device_before_loading_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--device cuda` on a machine without CUDA: `error: ...` before any model is loaded."""
    import common.models.loading as loading
    from common.activations import extract

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the device was checked")

    monkeypatch.setattr(loading, "load_model", no_load)
    argv = ["--sites", "resid_post.3", "--n-tokens", "10", "--device", "cuda"]
    with pytest.raises(SystemExit, match="is 'cuda' but this machine has no CUDA"):
        extract.main([*argv, "--out", str(tmp_path / "acts")])
