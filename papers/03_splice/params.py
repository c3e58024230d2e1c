"""Parameters of paper 03, declared once: params.yaml `papers.splice`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from common.kit.params import (
    ImageDatasets,
    NonNegInt,
    PaperParams,
    PositiveFloat,
    PositiveInt,
    Probability,
)


class Params(PaperParams):
    """SpLiCE: sparse nonnegative concept decompositions of CLIP-style image embeddings."""

    inputs = "vision"

    datasets: ImageDatasets = ["fashion-mnist", "digits"]
    n_eval: PositiveInt = 100
    """Test images per dataset and seed that are decomposed"""
    corpora: Annotated[
        list[Literal["wordnet", "fortunes", "shakespeare", "tweets"]], Field(min_length=1)
    ] = ["wordnet", "fortunes", "shakespeare", "tweets"]
    """Common/data/text.py"""
    docs_per_corpus: PositiveInt = 8000
    """Documents read per corpus for phrase counts (seeded prefix)"""
    n_unigrams: PositiveInt = 1000
    """Most frequent single words kept (before near-duplicate removal)"""
    n_bigrams: NonNegInt = 500
    """Most frequent two-word phrases kept (before near-duplicate removal)"""
    dedupe_threshold: Probability = 0.9
    """Drop a concept with cosine > this to a more frequent one (paper: 0.9)"""
    lambdas: Annotated[list[PositiveFloat], Field(min_length=2)] = [
        0.25,
        0.17,
        0.12,
        0.085,
        0.06,
        0.04,
    ]
    """Lasso penalties swept"""
    n_iter: PositiveInt = 100
    """FISTA iterations per lambda (warm-started)"""
    l0_target: PositiveFloat = 10
    """Matched-L0 comparisons"""
    l0_zero_shot: PositiveFloat = 20
    """Zero-shot retention check"""
    n_top: PositiveInt = 3
    """Top concepts per class read by the semantic judge"""
    n_pairs: PositiveInt = 6
    """Linearity check: composite image pairs per dataset and seed"""
