"""Parameters of paper 19, declared once: params.yaml `papers.saebench`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import CommaInts, PaperParams, PositiveInt, SweepRuns


class Params(PaperParams):
    """The suite over the architectures of the shared LM sweep; proxy metrics vs probing and
    absorption."""

    inputs = "lm"

    runs: SweepRuns = [
        "relu_l1_3",
        "gated_l1_6",
        "jumprelu",
        "topk_k32",
        "batchtopk_k32",
        "matryoshka_k32",
        "switch_k32",
        "archetypal_k32",
        "ra_k32",
    ]
    """One run of `lm_sweep.saes` per architecture (distinct architectures); the SAEs and their
    hyperparameters are the sweep's"""
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
