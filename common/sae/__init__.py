"""SAE architectures behind one interface (see ``base.py``) and one registry."""

from common.sae.base import SAE, LossOutput, SAEConfig, TrainContext
from common.sae.registry import available_architectures, build_sae, get_architecture, register

__all__ = [
    "SAE",
    "LossOutput",
    "SAEConfig",
    "TrainContext",
    "available_architectures",
    "build_sae",
    "get_architecture",
    "register",
]
