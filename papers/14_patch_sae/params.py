"""Parameters of paper 14, declared once: params.yaml `papers.patch_sae`."""

from __future__ import annotations

from common.kit.params import (
    ImageDatasets,
    NonNegFloat,
    NonNegInt,
    PaperParams,
    PositiveFloat,
    PositiveInt,
    Probability,
)


class Params(PaperParams):
    """ReLU SAE on the CLIP-style model's patch tokens: statistics, heat-maps, zero-shot."""

    inputs = "vision"

    datasets: ImageDatasets = ["fashion-mnist", "digits"]
    n_images: PositiveInt = 300
    """Train-split images per dataset"""
    n_test: PositiveInt = 150
    """Test-split images per dataset"""
    expansion: PositiveInt = 2
    """Dictionary size over the token width (1280)"""
    l1_coefficient: PositiveFloat = 4.0
    """Lambda, on tokens normalised to mean norm sqrt(d)"""
    l1_warmup_steps: NonNegInt = 20
    steps: PositiveInt = 200
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 0.001
    threshold: NonNegFloat = 0.1
    """Tau: a latent counts as active on a patch when h > tau (SAE units)"""
    top_k: PositiveInt = 16
    """Reference images per latent"""
    selective_fraction: Probability = 0.5
    """Class-selective: label entropy < this x log(number of labels)"""
    n_heatmap_latents: PositiveInt = 4
    n_heatmap_images: PositiveInt = 5
    extract_batch_size: PositiveInt = 64
