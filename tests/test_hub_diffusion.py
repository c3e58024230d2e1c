"""A tiny Stable-Diffusion-shaped pipeline saved with save_pretrained loads by path through the
same ``load_diffusion`` / ``sample`` / ``capture_sites`` / ``replace_site`` API the papers use."""

from __future__ import annotations

import json

import pytest
import torch

from common.models.diffusion import capture_sites, list_unet_sites, load_diffusion, sample

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_sd")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77)
    )  # fmt: skip
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        layers_per_block=1, norm_num_groups=4, attention_head_dim=2,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4, sample_size=16,
    )  # fmt: skip
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder / "pipe", safe_serialization=True)
    return folder / "pipe"


def test_hub_pipeline_samples_through_the_vae(tiny_sd):
    model = load_diffusion(tiny_sd, class_names=["cat", "dog"])
    assert model.image_size == 16 and model.vae is not None
    captions = [model.caption(c) for c in range(2)]
    images = sample(model, captions, num_steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    torch.testing.assert_close(images, sample(model, captions, num_steps=2, seed=0))


def test_hub_pipeline_sites_capture_like_the_small_model(tiny_sd):
    model = load_diffusion(tiny_sd, class_names=["cat", "dog"])
    sites = list_unet_sites(model.unet)
    assert sites[0] == "unet.down_blocks.0.attentions.0"
    assert "unet.mid_block.attentions.0" in sites and sites[-1].startswith("unet.up_blocks.1.")
    with capture_sites(model.unet, sites[:1]) as cap:
        sample(model, ["a photo of a cat"], num_steps=2, guidance_scale=1.0)
    tokens = cap.tokens(sites[0])
    assert tokens.shape == (2 * 8 * 8, 8)  # 2 steps x 8x8 latent positions, 8 channels
    assert sorted(set(cap.timesteps(sites[0]).tolist()), reverse=True)[0] == 999


def test_hub_pipeline_needs_class_names_and_refuses_downloads(tiny_sd):
    with pytest.raises(ValueError, match="class_names"):
        load_diffusion(tiny_sd)
    with pytest.raises(OSError, match="allow_download=True"):
        load_diffusion("no-such-org/no-such-pipeline", class_names=["cat"])
