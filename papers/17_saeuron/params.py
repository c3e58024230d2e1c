"""Parameters of paper 17, declared once: params.yaml `papers.saeuron`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from common.kit.params import (
    Device,
    DiffusionModelName,
    Fraction,
    NonNegFloat,
    NonNegInt,
    PaperParams,
    PositiveFloat,
    PositiveInt,
    ScorerName,
    Text,
    UNetSite,
)


class Params(PaperParams):
    """SAeUron: TopK+AuxK SAE on a U-Net cross-attention block; unlearning by negative scaling."""

    inputs = "diffusion"

    diffusion: DiffusionModelName = "data/diffusion/unet"
    """Train_diffusion's model, or a diffusers pipeline (hub id / folder)"""
    scorer: ScorerName = "data/diffusion/classifier"
    """Train_classifier's CNN, or a CLIP read zero-shot (hub id / folder)"""
    class_names: list[Text] = []
    """Concepts to prompt; empty: the 16x16 model's own classes"""
    device: Device = "cpu"
    """Where the U-Net (and a CLIP scorer) run: cpu, cuda"""
    site: UNetSite = "unet.up_blocks.0.attentions.1"
    """Cross-attention block whose update delta the SAE reads"""
    site_value: Literal["update", "output"] = "update"
    """The block's residual update (or `output`, what SAeUron reads)"""
    num_steps: PositiveInt = 4
    """DDIM steps (trailing spacing) for every sample: the timesteps t of the scores"""
    eta: Fraction = 1.0
    """DDIM eta (1: fresh noise each step)"""
    guidance_scale: Annotated[float, Field(ge=1)] = 3.0
    """Classifier-free guidance w"""
    per_template: PositiveInt = 4
    """Activation images per (class, caption template)"""
    activation_seed: NonNegInt = 1000
    """Sampling seed of the SAE's training prompts"""
    d_sae: PositiveInt = 512
    """SAE width (8x the 64 channels)"""
    k: PositiveInt = 8
    """TopK active features per token"""
    aux_coefficient: NonNegFloat = 0.03125
    """Alpha of the AuxK loss (1/32, Gao et al.)"""
    dead_after_tokens: PositiveInt = 20000
    """A feature is dead (AuxK revives it) after this many tokens unfired"""
    sae_steps: PositiveInt = 300
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.003
    score_delta: NonNegFloat = 1e-06
    """Delta in the score's denominators"""
    tau: PositiveInt = 8
    """Features kept per (class, timestep)"""
    gamma: Annotated[float, Field(lt=0)] = -20.0
    """Multiplier: f_i <- gamma * mu(i, t, D_c) * f_i"""
    n_eval: PositiveInt = 8
    """Fresh evaluation images per class prompt (template 0)"""
    eval_seed: NonNegInt = 7
    """Sampling seed of the evaluation (other than activation_seed)"""
    floor_seed: NonNegInt = 8
    """A second unedited sample set: seed-to-seed noise floor of the distances"""
    insert_targets: list[Text] = ["trouser", "shirt", "sneaker"]
    """Targets also run without the error term"""
    multi_targets: Annotated[list[Text], Field(min_length=1)] = [
        "trouser,sneaker",
        "t-shirt,bag,sandal",
    ]
    """Concept sets removed at once"""
    similar_groups: Annotated[list[Text], Field(min_length=1)] = [
        "t-shirt,pullover,coat,shirt",
        "sandal,sneaker,ankle boot",
    ]
    """Similar classes"""
    show_target: Text = "sneaker"
    """The target shown in the retention grid"""
    grid_images: PositiveInt = 4
    """Images per cell of the sample grids"""
