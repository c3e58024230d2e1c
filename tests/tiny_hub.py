"""Tiny random hub-format models saved with ``save_pretrained``: stand-ins for Stable Diffusion,
SDXL (Turbo) and a CLIP, to test the GPU/hub profile's loading code offline.

Their tokenizer is a character-level CLIP BPE (no merges), so any lowercase caption encodes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def char_tokenizer(folder: Path):
    """A CLIPTokenizer whose vocabulary is single letters (and their word-final forms)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def _text_config(vocab_size: int, hidden: int = 16, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {} if projection is None else {"projection_dim": projection}
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, **extra,
    )  # fmt: skip


def save_tiny_sd(folder: Path, *, sdxl: bool = False, seed: int = 0) -> Path:
    """A tiny SD 1.x-shaped (or SDXL-shaped) pipeline, 16x16 px images from 8x8x4 latents."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = char_tokenizer(folder / "_tokenizer")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    sdxl_unet = {}
    if sdxl:
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(len(tokenizer), 16, 12))
        sdxl_unet = dict(
            addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=6 * 4 + 12,
        )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32 if sdxl else 16, layers_per_block=1, norm_num_groups=4,
        attention_head_dim=2, **sdxl_unet,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )  # fmt: skip
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
        )  # fmt: skip
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )  # fmt: skip
    out = folder / ("sdxl" if sdxl else "sd")
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def save_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """A tiny random transformers CLIPModel (32 px, 8 px patches) with the letter tokenizer."""
    import transformers as T

    tokenizer = char_tokenizer(folder)
    vocab = len(tokenizer)
    text = T.CLIPTextConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    vision = T.CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=8,
    )  # fmt: skip
    config = T.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    config.projection_dim = 24
    torch.manual_seed(seed)
    T.CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
