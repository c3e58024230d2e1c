"""Parameters of paper 37, declared once: params.yaml `papers.one_step`."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from common.kit.params import (
    Device,
    DiffusionModelName,
    NonNegInt,
    PaperParams,
    PositiveFloat,
    PositiveInt,
    ScorerName,
    Text,
    UNetSites,
)


class Params(PaperParams):
    """SAEs on several cross-attention blocks of 1-step sampling; interventions, transfer."""

    inputs = "diffusion"

    diffusion: DiffusionModelName = "data/diffusion/unet"
    """Train_diffusion's model, or a diffusers pipeline (hub id / folder)"""
    scorer: ScorerName = "data/diffusion/classifier"
    """Train_classifier's CNN, or a CLIP read zero-shot (hub id / folder)"""
    class_names: list[Text] = []
    """Concepts to prompt; empty: the 16x16 model's own classes"""
    device: Device = "cpu"
    """Where the U-Net (and a CLIP scorer) run: cpu, cuda"""
    sites: UNetSites = "auto"
    """The analogues of the paper's four blocks + the last block"""
    guidance_scale: Annotated[float, Field(ge=1)] = 3.0
    """Classifier-free guidance w of every sampling run"""
    sample_batch_size: NonNegInt = 0
    """Captions per U-Net call; 0: all at once"""
    train_per_class: PositiveInt = 16
    """1-step SAE training images per class and caption template"""
    n_templates: PositiveInt = 4
    """Caption templates used for the training images ('a photo of a {}', ...)"""
    eval_per_class: PositiveInt = 8
    """Held-out images per class (FVU, ablations, splices), template 0"""
    four_step_per_class: PositiveInt = 16
    """4-step images per class for the 4-step SAE (templates cycled)"""
    k: PositiveInt = 4
    """TopK: active latents per token (L0)"""
    expansion: PositiveInt = 4
    """Latents per channel of the block update"""
    steps: PositiveInt = 150
    """SAE training steps"""
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.003
    n_features: PositiveInt = 8
    """Class-specific latents per class that are ablated / turned on"""
    steer_multiplier: PositiveFloat = 3.0
    """Alpha: turned-on latents get alpha x their mean class-B activation map"""
    sources_per_target: PositiveInt = 3
    """Prompted classes A per steering target B"""
    steer_images: PositiveInt = 2
    """Images per (A, B) pair"""
    validation_seed: NonNegInt = 200
    """Sampling seed (+ SAE seed) of the validation steering prompts that pick the steering block;
    never an evaluation seed (those are 7, 10-12 and 100 + seed)"""
    lowpass_cutoff: PositiveFloat = 2.0
    """Cycles per image: pixel change at radial frequency up to this is low"""
    grid_columns: PositiveInt = 6
    """Prompts shown in the intervention grids"""
