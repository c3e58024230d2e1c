"""Parameters of paper 45, declared once: params.yaml `papers.absorption`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import PaperParams, PositiveInt, SweepRuns


class Params(PaperParams):
    """First-letter absorption of the shared LM sweep's TopK SAEs across widths and L0, against a
    random-direction null."""

    inputs = "lm"

    width_runs: SweepRuns = ["topk_k32_w576", "topk_k32", "topk_k32_w2304"]
    """The width sweep: TopK runs of `lm_sweep.saes` at one k"""
    k_runs: SweepRuns = ["topk_k16", "topk_k32", "topk_k64"]
    """The L0 sweep: TopK runs of `lm_sweep.saes` at one width"""
    eval_tokens: PositiveInt = 10000
    """Held-out tokens for FVU and L0"""
    absorption_words: Annotated[int, Field(ge=50)] = 2000
    """First-letter vocabulary sample for the absorption metric"""
