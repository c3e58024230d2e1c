"""The U-Net, its noise schedule and the model folder: ``UNetConfig``, ``build_unet``,
``DiffusionModel`` (save) and ``load_diffusion``.

A small diffusers ``UNet2DConditionModel`` (one input channel, cross-attention over caption
tokens) with Stable Diffusion's schedule (``scaled_linear``, beta from 0.00085 to 0.012, 1000
steps), epsilon prediction, pixels scaled to [-1, 1]. A model folder holds ``unet/`` and
``scheduler/`` as diffusers folders (safetensors) and the model card ``diffusion.json``; a hub
Stable Diffusion pipeline loads through the same ``load_diffusion`` (``hub``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from common.models.diffusion.conditioning import (
    CAPTION_TEMPLATES,
    TEXT_ENCODER,
    CaptionEncoder,
    TextConditioner,
)

UNET_DIR, SCHEDULER_DIR, CHECKPOINT_FILE, MODEL_CARD = (
    "unet",
    "scheduler",
    "checkpoint.safetensors",
    "diffusion.json",
)


@dataclass(frozen=True)
class UNetConfig:
    """A small ``UNet2DConditionModel``: one resolution level per entry of ``channels``.

    The first (full-resolution) level has plain ResNet blocks, the others ResNet + cross-attention
    transformer blocks, each level halving the resolution; ``heads`` attention heads per block.
    """

    image_size: int = 16
    channels: tuple[int, ...] = (16, 32, 64)
    layers_per_block: int = 1
    heads: int = 4
    norm_groups: int = 8
    cross_attention_dim: int = 384

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) < 2:
            raise ValueError(f"need >= 2 levels (one with cross-attention), got {self.channels}")
        bad = [c for c in self.channels if c % self.norm_groups or c % self.heads]
        if bad:
            raise ValueError(
                f"channels {bad} are not divisible by norm_groups={self.norm_groups} and "
                f"heads={self.heads}; pick multiples of both"
            )
        if self.image_size % 2 ** (len(self.channels) - 1):
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2^{len(self.channels) - 1}"
            )


def build_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    """The diffusers U-Net of ``cfg`` (1 input/output channel), randomly initialised."""
    n = len(cfg.channels)
    return UNet2DConditionModel(
        sample_size=cfg.image_size,
        in_channels=1,
        out_channels=1,
        layers_per_block=cfg.layers_per_block,
        block_out_channels=cfg.channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cfg.cross_attention_dim,
        # diffusers' historical naming: ``attention_head_dim`` here sets the number of heads.
        attention_head_dim=cfg.heads,
        norm_num_groups=cfg.norm_groups,
    )


def noise_scheduler(num_train_timesteps: int = 1000) -> DDPMScheduler:
    """Stable Diffusion's schedule: beta_t on a line in sqrt-space from 0.00085 to 0.012."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=True,
        clip_sample_range=1.0,
    )


@dataclass
class DiffusionModel:
    """A U-Net, its training noise schedule, the caption encoder and the class vocabulary."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    encoder: TextConditioner
    class_names: tuple[str, ...]
    templates: tuple[str, ...] = CAPTION_TEMPLATES
    metadata: dict[str, Any] = field(default_factory=dict)
    vae: Any = None  # latent diffusion (hub Stable Diffusion): decodes z_0 to pixels

    @property
    def image_size(self) -> int:
        """Side of the drawn images in pixels (the latent side times the VAE's upsampling)."""
        side = int(self.unet.config.sample_size)
        if self.vae is not None:
            side *= 2 ** (len(self.vae.config.block_out_channels) - 1)
        return side

    def caption(self, class_id: int, template: int = 0) -> str:
        """``templates[template]`` filled with the class name, e.g. "a photo of a sneaker"."""
        if not 0 <= template < len(self.templates) or not 0 <= class_id < len(self.class_names):
            raise IndexError(
                f"template {template} / class {class_id} out of range: the model has "
                f"{len(self.templates)} templates and {len(self.class_names)} classes"
            )
        return self.templates[template].format(self.class_names[class_id])

    def save(self, folder: str | Path) -> None:
        """``unet/`` and ``scheduler/`` as diffusers folders (safetensors) + ``diffusion.json``."""
        if self.vae is not None:
            raise ValueError("a hub pipeline is loaded by name; there is nothing to save")
        folder = Path(folder)
        self.unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
        self.scheduler.save_pretrained(folder / SCHEDULER_DIR)
        card = {
            "class_names": list(self.class_names),
            "templates": list(self.templates),
            "text_encoder": TEXT_ENCODER,
            "text_encoder_revision": self.encoder.revision,
            "max_tokens": self.encoder.max_tokens,
            **self.metadata,
        }
        (folder / MODEL_CARD).write_text(json.dumps(card, indent=1) + "\n")


def load_diffusion(
    folder: str | Path,
    encoder: CaptionEncoder | None = None,
    *,
    class_names: Sequence[str] | None = None,
    allow_download: bool = False,
    device: str | torch.device = "cpu",
) -> DiffusionModel:
    """Load a folder written by ``DiffusionModel.save`` (safetensors only), frozen, eval mode,
    with its U-Net on ``device``; ``class_names``, if given, must be the model card's.

    A diffusers Stable Diffusion / SDXL pipeline (a folder with ``model_index.json`` or a hub id
    such as ``stabilityai/sdxl-turbo``) loads through ``common.models.diffusion.hub`` instead;
    it needs ``class_names`` (the concepts to prompt for) and downloads only with
    ``allow_download=True``.
    """
    from common.models.diffusion.hub import is_hub_pipeline, load_hub_diffusion

    if is_hub_pipeline(folder):
        return load_hub_diffusion(
            folder, class_names or (), allow_download=allow_download, device=str(device)
        )
    folder = Path(folder)
    card_path = folder / MODEL_CARD
    if not card_path.is_file() or not (folder / UNET_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a trained diffusion model (no {MODEL_CARD} or {UNET_DIR}/); train "
            f"one with `python -m common.models.diffusion train --out {folder}`"
        )
    card = json.loads(card_path.read_text())
    if class_names and tuple(class_names) != tuple(card["class_names"]):
        raise ValueError(
            f"{folder} was trained on the classes {card['class_names']}, not {list(class_names)}; "
            "leave class_names empty to use the model's own"
        )
    unet = UNet2DConditionModel.from_pretrained(folder / UNET_DIR, use_safetensors=True)
    unet.to(device).eval().requires_grad_(False)
    scheduler = DDPMScheduler.from_pretrained(folder / SCHEDULER_DIR)
    encoder = encoder or CaptionEncoder(max_tokens=card["max_tokens"])
    if encoder.max_tokens != card["max_tokens"]:
        raise ValueError(
            f"encoder pads to {encoder.max_tokens} tokens but the model was trained with "
            f"{card['max_tokens']}; pass CaptionEncoder(max_tokens={card['max_tokens']})"
        )
    if encoder.revision != card["text_encoder_revision"]:
        raise ValueError(
            f"{folder} was trained on {card['text_encoder']} revision "
            f"{card['text_encoder_revision'][:12]}, but the installed one is "
            f"{encoder.revision[:12]}: the caption embeddings differ; retrain the model"
        )
    keys = ("class_names", "templates", "text_encoder", "text_encoder_revision", "max_tokens")
    return DiffusionModel(
        unet=unet,
        scheduler=scheduler,
        encoder=encoder,
        class_names=tuple(card["class_names"]),
        templates=tuple(card["templates"]),
        metadata={k: v for k, v in card.items() if k not in keys},
    )
