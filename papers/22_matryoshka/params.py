"""Parameters of paper 22, declared once: params.yaml `papers.matryoshka`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import PaperParams, PositiveFloat, PositiveInt, SweepRun


class Params(PaperParams):
    """Matryoshka vs BatchTopK: absorption (hierarchy toy, first letters), sparse probing and FVU;
    the LM SAEs come from the shared LM sweep."""

    inputs = "lm"

    toy_samples: PositiveInt = 20000
    toy_parents: PositiveInt = 16
    toy_children_per_parent: PositiveInt = 3
    toy_d: PositiveInt = 48
    toy_k: PositiveInt = 3
    toy_steps: PositiveInt = 1000
    toy_batch_size: PositiveInt = 256
    toy_lr: PositiveFloat = 0.003
    matryoshka_run: SweepRun = "matryoshka_k32"
    """The LM Matryoshka SAE: a run of `lm_sweep.saes` (its prefixes are the run's)"""
    batchtopk_run: SweepRun = "batchtopk_k32"
    """The LM baseline: a BatchTopK run of `lm_sweep.saes` of the same width and k"""
    eval_tokens: PositiveInt = 10000
    """Held-out tokens for FVU and L0"""
    absorption_words: Annotated[int, Field(ge=50)] = 2000
    """First-letter vocabulary sample for the absorption metric"""
    probe_docs: PositiveInt = 512
    """WordNet test glosses for sparse probing (labels: lexicographer categories)"""
    probe_max_len: Annotated[int, Field(ge=2)] = 32
    probe_tasks: PositiveInt = 8
    """One-vs-rest probing tasks: the most frequent categories"""
    probe_ks: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 5]
    probe_min_class: PositiveInt = 10
    """Smallest class size of a probing task"""
