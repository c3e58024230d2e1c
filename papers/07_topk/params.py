"""Parameters of paper 07, declared once: params.yaml `papers.topk`."""

from __future__ import annotations

from common.kit.params import PaperParams, PositiveInt, SweepRun, SweepRuns


class Params(PaperParams):
    """TopK vs ReLU frontier, dead latents with/without AuxK + tied init, width and k scaling,
    on SAEs of the shared LM sweep."""

    inputs = "lm"

    relu_runs: SweepRuns = ["relu_l1_1p5", "relu_l1_3", "relu_l1_6"]
    """The ReLU + L1 baseline: runs of `lm_sweep.saes` at one width, several L1 coefficients"""
    topk_runs: SweepRuns = ["topk_k8", "topk_k16", "topk_k24", "topk_k32", "topk_k64"]
    """TopK at the baseline's width, several k: the frontier and the k scaling law"""
    width_runs: SweepRuns = ["topk_k8_w576", "topk_k8", "topk_k8_w2304"]
    """TopK at one k, several widths: the width scaling law"""
    plain_run: SweepRun = "topk_k8_w2304_plain"
    """TopK without AuxK or tied init, at the widest width run's width and k (dead latents)"""
    eval_tokens: PositiveInt = 10000
    """Held-out tokens for FVU, L0 and dead latents"""
