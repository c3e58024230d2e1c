"""One registry of architectures, keyed by name.

``@register`` on an ``SAE`` subclass adds it; ``build_sae(name, **hyperparameters)`` builds one and
fails with the list of valid names or fields on a typo.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from common.sae.base import SAE

_REGISTRY: dict[str, type[SAE]] = {}

# Modules whose import registers architectures; imported lazily so the registry is complete.
_ARCHITECTURE_MODULES = (
    "common.sae.relu",
    "common.sae.gated",
    "common.sae.topk",
    "common.sae.jumprelu",
    "common.sae.matryoshka",
    "common.sae.switch",
    "common.sae.archetypal",
    "common.sae.mp",
    "common.sae.universal",
)


def register(cls: type[SAE]) -> type[SAE]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} must set a non-empty `name` to be registered")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TypeError(f"architecture name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _import_all() -> None:
    for module in _ARCHITECTURE_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside an existing module
                raise


def available_architectures() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_architecture(name: str) -> type[SAE]:
    _import_all()
    if name not in _REGISTRY:
        raise ValueError(
            f"Unknown SAE architecture {name!r}. "
            f"Valid architectures: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


def build_sae(name: str, **hyperparameters: Any) -> SAE:
    """Build architecture ``name`` from its config fields; unknown fields are an error."""
    cls = get_architecture(name)
    fields = {f.name for f in dataclasses.fields(cls.config_class)}
    unknown = sorted(set(hyperparameters) - fields)
    if unknown:
        raise ValueError(
            f"Unknown hyperparameter(s) {unknown} for architecture {name!r}. "
            f"Valid: {sorted(fields)}"
        )
    cfg = cls.config_class(**hyperparameters)
    torch_seed = getattr(cfg, "seed", 0)
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(torch_seed)
        return cls(cfg)
