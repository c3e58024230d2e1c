"""One check for a torch device name, used by the trainer, the evals and the params check.

A device string that torch cannot parse, or that names hardware this machine does not have
(``cuda`` without CUDA, ``cuda:3`` on a one-GPU machine, ``mps`` off Apple silicon), fails here,
before any model is loaded or any data is read, with the fix in the message.
"""

from __future__ import annotations

import torch


def resolve_device(name: str, *, key: str = "device") -> torch.device:
    """The ``torch.device`` for ``name``, or a ValueError naming ``key``, the value and the fix."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`{key}` must be a device name such as 'cpu' or 'cuda', got {name!r}")
    try:
        device = torch.device(name.strip())
    except RuntimeError as err:
        raise ValueError(
            f"`{key}` is {name!r}, which is not a torch device; use 'cpu', 'cuda' or 'cuda:N'"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"`{key}` is {name!r} but this machine has no CUDA device "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); "
                "use 'cpu', or run where `torch.cuda.is_available()` is true"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"`{key}` is {name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; "
                f"use 'cuda:0' .. 'cuda:{torch.cuda.device_count() - 1}'"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"`{key}` is {name!r} but MPS is not available here; use 'cpu'")
    elif device.type != "cpu":
        raise ValueError(f"`{key}` is {name!r}; supported devices are 'cpu', 'cuda[:N]', 'mps'")
    return device
