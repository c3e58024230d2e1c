"""Parameters of paper 34, declared once: params.yaml `papers.sauce`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from common.kit.params import Distinct, NonNegInt, PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """SAUCE: unlearn a concept by scaling its top-k SAE features (EfficientNet pooled features)."""

    inputs = "vision"

    expansion: PositiveInt = 2
    """SAE width over the feature width (1280)"""
    l1_coefficient: PositiveFloat = 4.0
    """Alpha, on features normalised to mean norm sqrt(d)"""
    l1_warmup_steps: NonNegInt = 10
    steps: PositiveInt = 100
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 0.003
    delta: PositiveFloat = 1e-06
    """The score's denominator guard"""
    negatives: Literal["all", "same_domain"] = "all"
    """Or same_domain"""
    digit_concepts: Annotated[
        list[Annotated[int, Field(ge=0, le=9)]], Field(min_length=1), Distinct
    ] = [0, 3, 7]
    """Digits unlearned besides every Fashion-MNIST class"""
    k_values: Annotated[list[PositiveInt], Field(min_length=1)] = [2, 4, 8, 16, 32, 64]
    """Number of selected features (sweep)"""
    gammas: Annotated[list[float], Field(min_length=1)] = [0.0, -1.0, -2.0, -4.0]
    """Scale of the selected features (sweep; SAUCE: negative)"""
    k_main: PositiveInt = 16
    """The operating point, chosen on a held-out part of the training split"""
    gamma_main: float = -2.0
    multi_size: Annotated[int, Field(ge=2, le=9)] = 3
    """Multi-concept unlearning: Fashion-MNIST classes unlearned together in one edit"""
    n_multi_sets: PositiveInt = 3
    """Multi-concept unlearning: concept sets per seed (a seeded draw)"""
    wu_lr: PositiveFloat = 0.001
    """Weight-update baseline: Adam learning rate of the probe-head fine-tuning"""
    wu_max_steps: PositiveInt = 300
    """Weight-update baseline: at most this many full-batch steps"""
    wu_stop_ua: Annotated[float, Field(gt=0, le=1)] = 0.9
    """Weight-update baseline: stop once this share of the forget set's training images is no
    longer recognised (the claims' unlearning threshold)"""
    probe_c: PositiveFloat = 0.1
    """Inverse L2 strength of the logistic-regression probe"""
    n_grid_features: PositiveInt = 3
    """Image grid: top features per concept shown"""
    n_grid_images: PositiveInt = 6
    """Image grid: top-activating images per feature"""
