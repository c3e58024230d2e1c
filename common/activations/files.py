"""Plain activation files (``.npy`` or ``.safetensors``, one ``N x d`` matrix) and their checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from numpy.lib import format as npy_format
from safetensors import SafetensorError, safe_open
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
_FIX = {
    ".npy": "Re-create it with numpy.save(path, x) for an (n_tokens, d) float array, or re-run the "
    "step that wrote it.",
    ".safetensors": "Re-create it with safetensors.torch.save_file({'activations': x}, path) for "
    "an (n_tokens, d) float tensor, or re-run the step that wrote it.",
}


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


def _npy_problem(path: Path, size: int) -> str | None:
    """What makes a ``.npy`` file unreadable (bad header, object dtype, truncated), or ``None``."""
    with open(path, "rb") as f:
        try:
            version = npy_format.read_magic(f)
        except ValueError:
            return "is not a .npy file (it does not start with the numpy magic string)"
        if version not in ((1, 0), (2, 0)):
            return None  # other versions: numpy reports its own errors
        read_header = (
            npy_format.read_array_header_1_0
            if version == (1, 0)
            else npy_format.read_array_header_2_0
        )
        try:
            shape, _, dtype = read_header(f)
        except ValueError as err:
            return f"has a truncated or damaged .npy header ({err})"
        data_start = f.tell()
    if dtype.hasobject:
        return f"holds Python objects (dtype {dtype}), not numbers; it is never unpickled"
    expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if size < expected:
        return f"is truncated: expected {expected} bytes for shape {shape} {dtype}, found {size}"
    return None


def _safetensors_problem(path: Path, size: int) -> str | None:
    """What makes a ``.safetensors`` file unreadable (header, truncation), or ``None``."""
    if size < 8:
        return f"is truncated: expected at least 8 bytes (the header length), found {size}"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > SAFETENSORS_MAX_HEADER:
            return f"is not a safetensors file (its first 8 bytes give a header of {n} bytes)"
        if 8 + n > size:
            return f"is truncated: expected at least {8 + n} bytes (the header), found {size}"
        try:
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            expected = 8 + n + max((int(e) for e in ends), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "is not a safetensors file (its header is not the expected JSON)"
    if size < expected:
        return f"is truncated: expected {expected} bytes, found {size}"
    return None


def _file_problem(path: Path) -> str | None:
    """Why an activation file cannot be read (empty, truncated, wrong format), or ``None``."""
    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    if path.suffix == ".npy":
        return _npy_problem(path, size)
    return _safetensors_problem(path, size)


def load_activation_file(path: str | Path, key: str | None = None) -> Tensor:
    """Load an ``N x d`` activation matrix from ``.npy`` (no pickle) or ``.safetensors``.

    For safetensors with several tensors, ``key`` picks one (default: the only tensor, or
    ``"activations"``). An empty, truncated or malformed file raises ``ValueError`` saying so.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"activation file {path} does not exist")
    if path.suffix not in _FIX:
        raise ValueError(
            f"{path}: unsupported activation file type {path.suffix!r}; use .npy or .safetensors"
        )
    if problem := _file_problem(path):
        raise ValueError(f"activation file {path} {problem}. {_FIX[path.suffix]}")
    if path.suffix == ".npy":
        array = np.load(path, allow_pickle=False, mmap_mode="r")
        x = torch.from_numpy(np.array(array))  # a writable copy of the memory map
    else:
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                if key is None:
                    key = keys[0] if len(keys) == 1 else "activations"
                if key not in keys:
                    raise KeyError(f"{path}: no tensor {key!r}; tensors in the file: {keys}")
                x = f.get_tensor(key)
        except SafetensorError as err:
            raise ValueError(
                f"activation file {path} is not a readable safetensors file ({err}). "
                f"{_FIX[path.suffix]}"
            ) from err
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
