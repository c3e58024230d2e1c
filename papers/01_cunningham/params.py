"""Parameters of paper 01, declared once: params.yaml `papers.cunningham`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """Tied ReLU SAE vs PCA / ICA / neurons at the residual and MLP-output sites."""

    inputs = "lm"

    train_tokens: PositiveInt = 200000
    """SAE training tokens loaded per site"""
    expansion: PositiveInt = 2
    """Dictionary size over d_in"""
    l1_coefficient: PositiveFloat = 2.0
    """Alpha, on activations normalised to mean norm sqrt(d_in)"""
    steps: PositiveInt = 200
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.003
    baseline_tokens: PositiveInt = 5000
    """Tokens PCA / ICA are fitted on"""
    n_components: PositiveInt = 128
    """PCA / ICA / random directions (each also read with both signs)"""
    ica_max_iter: PositiveInt = 200
    n_top_docs: PositiveInt = 20
    """Documents read per direction for label purity"""
    probe_ks: Annotated[list[PositiveInt], Field(min_length=1)] = [1, 5]
    probe_tasks: PositiveInt = 8
    probe_min_class_size: Annotated[int, Field(ge=2)] = 10
