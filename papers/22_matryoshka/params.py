"""Parameters of paper 22, declared once: params.yaml `papers.22_matryoshka`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import PaperParams, PositiveFloat, PositiveInt, PrefixFractions


class Params(PaperParams):
    """Matryoshka vs BatchTopK: absorption (hierarchy toy, first letters) and FVU."""

    inputs = "lm"

    toy_samples: PositiveInt = 20000
    toy_parents: PositiveInt = 16
    toy_children_per_parent: PositiveInt = 3
    toy_d: PositiveInt = 48
    toy_k: PositiveInt = 3
    toy_steps: PositiveInt = 1000
    toy_batch_size: PositiveInt = 256
    toy_lr: PositiveFloat = 0.003
    train_tokens: PositiveInt = 100000
    """First N training tokens held in memory"""
    eval_tokens: PositiveInt = 10000
    """Held-out tokens for FVU and L0"""
    d_sae: PositiveInt = 1152
    k: PositiveInt = 32
    prefix_fractions: PrefixFractions = [0.0625, 0.125, 0.25, 0.5, 1.0]
    """Nested dictionary sizes / d_sae"""
    steps: PositiveInt = 200
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.002
    absorption_words: Annotated[int, Field(ge=50)] = 2000
    """First-letter vocabulary sample for the absorption metric"""
