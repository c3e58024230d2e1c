"""Parameters of paper 07, declared once: params.yaml `papers.07_topk`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import NonNegInt, PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """TopK vs ReLU frontier, dead latents with/without AuxK + tied init, width scaling."""

    inputs = "lm"

    train_tokens: PositiveInt = 100000
    """First N training tokens held in memory"""
    eval_tokens: PositiveInt = 10000
    """Held-out tokens for FVU, L0 and dead latents"""
    d_sae: PositiveInt = 1152
    """Width of the frontier runs"""
    steps: PositiveInt = 150
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.002
    l1_warmup_steps: NonNegInt = 20
    relu_l1: Annotated[list[PositiveFloat], Field(min_length=2)] = [1.5, 3.0, 6.0]
    """The ReLU + L1 baseline's sparsity coefficients"""
    topk_k: Annotated[list[PositiveInt], Field(min_length=2)] = [8, 24, 64]
    """TopK frontier"""
    width_k: PositiveInt = 8
    """Fixed k of the width sweep and of the dead-latent comparison"""
    widths: Annotated[list[PositiveInt], Field(min_length=2)] = [576, 1152, 2304]
    """Width sweep; the last one also hosts the dead-latent comparison"""
    dead_after_tokens: PositiveInt = 10240
    """A latent silent this long is 'dead' for AuxK during training"""
