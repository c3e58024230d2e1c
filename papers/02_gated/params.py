"""Parameters of paper 02, declared once: params.yaml `papers.gated`."""

from __future__ import annotations

from common.kit.params import NonNegInt, PaperParams, PositiveInt, SweepRuns


class Params(PaperParams):
    """Gated vs ReLU frontiers (FVU, CE loss recovered vs L0) and shrinkage, on SAEs of the
    shared LM sweep."""

    inputs = "lm"

    relu_runs: SweepRuns = ["relu_l1_1p5", "relu_l1_3", "relu_l1_6"]
    """The ReLU + L1 baseline: runs of `lm_sweep.saes`, one per sparsity coefficient"""
    gated_runs: SweepRuns = ["gated_l1_3", "gated_l1_6", "gated_l1_12"]
    """The gated SAEs (the penalty on the gate): runs of `lm_sweep.saes`"""
    eval_tokens: PositiveInt = 5000
    """Held-out tokens for FVU, L0, shrinkage"""
    downstream_windows: NonNegInt = 2
    """Test windows for CE loss recovered; 0 skips it"""
