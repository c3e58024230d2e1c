"""Parameters of paper 21, declared once: params.yaml `papers.universal`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import (
    EfficientNetSites,
    Fraction,
    ImageDatasets,
    PaperParams,
    PositiveFloat,
    PositiveInt,
)


class Params(PaperParams):
    """Universal SAE over two EfficientNet depths: cross-reconstruction, co-firing."""

    inputs = "vision"

    datasets: ImageDatasets = ["fashion-mnist", "digits"]
    n_train: PositiveInt = 500
    """Train-split images per dataset"""
    n_test: PositiveInt = 200
    """Test-split images per dataset"""
    image_size: Annotated[int, Field(ge=32)] = 112
    """EfficientNet input resolution (the originals are 28 px and 8 px)"""
    sites: EfficientNetSites = ["block.10", "features"]
    """The 'models': pooled activations of these EfficientNet sites"""
    d_sae: PositiveInt = 128
    """Latents of the shared code (and of each independent SAE)"""
    k: PositiveInt = 16
    """TopK: active latents per image"""
    steps: PositiveInt = 600
    """Optimiser steps (USAE, shuffled USAE and each independent SAE)"""
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 0.002
    ridge_alphas: Annotated[list[PositiveFloat], Field(min_length=1)] = [
        0.001,
        0.01,
        0.1,
        1.0,
        10.0,
    ]
    """Ridge penalties (x N) tried by 4-fold CV"""
    min_fires: PositiveInt = 5
    """A latent is alive when it fires on at least this many test images"""
    shared_threshold: Fraction = 0.5
    """A latent is shared when its co-firing (Jaccard) exceeds this"""
    n_concepts: PositiveInt = 6
    """Rows of the side-by-side image grid"""
    n_top_images: PositiveInt = 5
    """Top-activating images per concept and per model"""
    extract_batch_size: PositiveInt = 64
