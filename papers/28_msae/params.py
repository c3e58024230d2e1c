"""Parameters of paper 28, declared once: params.yaml `papers.msae`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import (
    ImageDatasets,
    Increasing,
    NonNegFloat,
    PaperParams,
    PositiveFloat,
    PositiveInt,
    Probability,
)


class Params(PaperParams):
    """Matryoshka SAE (nested k) vs TopK vs ReLU on CLIP-style embeddings; naming; retrieval."""

    inputs = "vision"

    datasets: ImageDatasets = ["fashion-mnist", "digits"]
    n_train: PositiveInt = 2000
    """= clip_style.n_train, so the stage's cached feature chunks are reused"""
    n_test: PositiveInt = 1000
    """= clip_style.n_test"""
    expansion: PositiveInt = 2
    """Dictionary size over the embedding width (256)"""
    msae_ks: Annotated[list[PositiveInt], Field(min_length=1), Increasing] = [8, 16, 32, 64]
    """Nested k_1 < ... < k_h of the MSAE"""
    msae_alphas: list[NonNegFloat] | None = None
    """Uniform weights (the paper's UW variant)"""
    topk_ks: Annotated[list[PositiveInt], Field(min_length=1), Increasing] = [8, 16, 32, 64]
    """One TopK SAE per k, same width"""
    relu_l1: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 3.0, 8.0]
    """One ReLU + L1 SAE per coefficient, same width"""
    steps: PositiveInt = 200
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 0.003
    dead_after_tokens: PositiveInt = 20000
    """AuxK of the TopK baselines revives latents silent this long"""
    vocab_size: PositiveInt = 300
    """WordNet nouns added to the 20 class names, most frequent in WordNet glosses"""
    vocab_template: Annotated[str, Field(pattern=r"\{\}")] = "a photo of a {}."
    """Each word is embedded in this prompt"""
    name_threshold: Annotated[float, Field(ge=-1, lt=1)] = 0.2
    """A latent is named only if cos(decoder column, word) exceeds this"""
    top_m: PositiveInt = 10
    """Top test images per latent (label entropy, purity)"""
    min_purity: Probability = 0.8
    """'mostly one class': share of the majority class among the top_m images"""
    n_queries: PositiveInt = 100
    """Test images used as retrieval queries"""
    n_neighbours: PositiveInt = 10
    """Retrieved gallery (train) images per query"""
    steer_strengths: Annotated[list[NonNegFloat], Field(min_length=2), Increasing] = [
        0.0,
        1.0,
        2.0,
        3.0,
        4.0,
        6.0,
        8.0,
        12.0,
        16.0,
    ]
    """Steering strengths a, from 0 (plain retrieval); the claim reads the largest a at which the
    query's own class keeps at least half of its unsteered share of the neighbours"""
    n_show_latents: PositiveInt = 6
    """Latents in the naming grid"""
    n_show_images: PositiveInt = 6
    """Top images per latent in the naming grid"""
