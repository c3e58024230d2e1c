"""Plain activation files (``.npy`` or ``.safetensors``, one ``N x d`` matrix) and their checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_activations(x: Tensor, source: str = "activations") -> Tensor:
    """Return ``x`` as fp32 after checking it is a finite, floating ``N x d`` matrix."""
    if x.ndim != 2:
        raise ValueError(
            f"{source}: expected a 2-D (n_tokens, d_in) matrix, got shape {tuple(x.shape)}. "
            "Flatten batch and position dimensions first, e.g. x.reshape(-1, x.shape[-1])."
        )
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{source}: expected a floating dtype (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{source}: empty activation matrix of shape {tuple(x.shape)}")
    x = x.float()
    # min/max propagate NaN and reach +-Inf, and are much cheaper than isfinite on a big matrix.
    low, high = torch.aminmax(x)
    if not (torch.isfinite(low) and torch.isfinite(high)):
        bad = ~torch.isfinite(x)
        rows = bad.any(1).nonzero().flatten()
        raise ValueError(
            f"{source}: {int(bad.sum())} NaN/Inf values in {len(rows)} rows "
            f"(first bad row {int(rows[0])}). Drop or fix those rows before training."
        )
    return x


def load_activation_file(path: str | Path, key: str | None = None) -> Tensor:
    """Load an ``N x d`` activation matrix from ``.npy`` (no pickle) or ``.safetensors``.

    For safetensors with several tensors, ``key`` picks one (default: the only tensor, or
    ``"activations"``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activation file {path} does not exist")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False, mmap_mode="r")
        x = torch.from_numpy(np.array(array))  # a writable copy of the memory map
    elif path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if key is None:
                key = keys[0] if len(keys) == 1 else "activations"
            if key not in keys:
                raise KeyError(f"{path}: no tensor {key!r}; tensors in the file: {keys}")
            x = f.get_tensor(key)
    else:
        raise ValueError(
            f"{path}: unsupported activation file type {path.suffix!r}; use .npy or .safetensors"
        )
    return check_activations(x, source=str(path))


def load_activations(
    path: str | Path, key: str | None = None, max_tokens: int | None = None
) -> Tensor:
    """An activation file, or the first ``max_tokens`` rows of an activation store folder."""
    path = Path(path)
    if path.is_dir():
        from common.activations.store import ActivationStore

        x = ActivationStore(path).tensor(max_tokens)
        return check_activations(x, source=str(path))
    x = load_activation_file(path, key=key)
    return x if max_tokens is None else x[:max_tokens]
