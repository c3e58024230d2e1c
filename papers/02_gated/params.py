"""Parameters of paper 02, declared once: params.yaml `papers.02_gated`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import NonNegInt, PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """Gated vs ReLU frontiers (FVU, CE loss recovered vs L0) and shrinkage."""

    inputs = "lm"

    train_tokens: PositiveInt = 100000
    """First N training tokens held in memory"""
    eval_tokens: PositiveInt = 5000
    """Held-out tokens for FVU, L0, shrinkage"""
    d_sae: PositiveInt = 1152
    steps: PositiveInt = 150
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.002
    l1_warmup_steps: NonNegInt = 20
    relu_l1: Annotated[list[PositiveFloat], Field(min_length=2)] = [1.5, 3.0, 6.0]
    """Sparsity coefficients of the ReLU baseline"""
    gated_l1: Annotated[list[PositiveFloat], Field(min_length=2)] = [3.0, 6.0, 12.0]
    """Sparsity coefficients of the gated SAE (on the gate only)"""
    downstream_windows: NonNegInt = 2
    """Test windows for CE loss recovered; 0 skips it"""
