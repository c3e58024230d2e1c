"""Parameters of paper 46, declared once: params.yaml `papers.monosemanticity`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from common.kit.params import ImageDatasets, PaperParams, PositiveFloat, PositiveInt


class Params(PaperParams):
    """Monosemanticity score of SAE latents vs neurons, across width and k."""

    inputs = "vision"

    datasets: ImageDatasets = ["fashion-mnist", "digits"]
    n_eval: PositiveInt = 500
    """Held-out training images per dataset that every score uses"""
    architecture: Literal["topk", "batchtopk", "matryoshka"] = "matryoshka"
    """The paper's SAE (Matryoshka BatchTopK) for the main comparison"""
    sweep_architecture: Literal["topk", "batchtopk", "matryoshka"] = "topk"
    """SAE for the width and sparsity sweeps"""
    expansion: PositiveInt = 4
    """Main SAE width over the embedding width (256)"""
    k: PositiveInt = 16
    """Main SAE: active latents per image"""
    expansions: Annotated[list[PositiveInt], Field(min_length=2)] = [1, 2, 4, 8]
    """Width sweep, at k"""
    ks: Annotated[list[PositiveInt], Field(min_length=2)] = [4, 8, 16, 32]
    """Sparsity sweep, at expansion"""
    steps: PositiveInt = 150
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 0.001
    embedder_block: Annotated[int, Field(ge=0, le=15)] = 10
    """The image embedder E: pooled EfficientNet-Lite0 block 10"""
    embedder_size: PositiveInt = 64
    """Px: image size fed to the embedder network"""
    pixel_size: PositiveInt = 28
    """Second (sanity) embedder: centred pixels at this size"""
    min_fires: PositiveInt = 5
    """A latent/neuron enters the image grids only if it is nonzero on this many images"""
    n_grid_latents: PositiveInt = 4
    """Latents shown for the highest and for the lowest wMS"""
    n_grid_images: PositiveInt = 8
    """Top images per latent"""
