"""Parameters of paper 45, declared once: params.yaml `papers.45_absorption`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from common.kit.params import PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """First-letter absorption of TopK SAEs across widths and L0."""

    inputs = "lm"

    architecture: Literal["topk", "batchtopk"] = "topk"
    train_tokens: PositiveInt = 100000
    """First N training tokens held in memory"""
    eval_tokens: PositiveInt = 10000
    """Held-out tokens for FVU and L0"""
    widths: Annotated[list[PositiveInt], Field(min_length=2)] = [576, 1152, 2304]
    """Width sweep, all at k width_sweep_k"""
    width_sweep_k: PositiveInt = 32
    ks: Annotated[list[PositiveInt], Field(min_length=2)] = [16, 32, 64]
    """L0 sweep, all at width k_sweep_width"""
    k_sweep_width: PositiveInt = 1152
    steps: PositiveInt = 200
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.002
    absorption_words: Annotated[int, Field(ge=50)] = 2000
    """First-letter vocabulary sample for the absorption metric"""
