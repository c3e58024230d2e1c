"""Parameters of paper 19, declared once: params.yaml `papers.19_saebench`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import ArchitectureList, CommaInts, PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """The suite over the registry; proxy metrics vs probing and absorption."""

    inputs = "lm"

    architectures: ArchitectureList = (
        "relu,gated,jumprelu,topk,batchtopk,matryoshka,switch,archetypal,ra"
    )
    """Comma-separated"""
    d_sae: PositiveInt = 1152
    k: PositiveInt = 32
    """L0 target of the TopK family"""
    steps: PositiveInt = 120
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.001
    train_tokens: PositiveInt = 100000
    eval_tokens: PositiveInt = 10000
    probe_docs: PositiveInt = 256
    """Per probing data set (WordNet categories, tweet sentiment)"""
    probe_max_len: Annotated[int, Field(ge=2)] = 32
    probe_tasks: PositiveInt = 3
    """WordNet one-vs-rest tasks (most frequent categories)"""
    probe_ks: CommaInts = "1,5"
    probe_min_class: PositiveInt = 10
    """Smallest class size of a probing task"""
    absorption_words: PositiveInt = 2000
    loss_windows: PositiveInt = 2
    loss_context: Annotated[int, Field(ge=2)] = 64
