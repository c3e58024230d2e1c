"""Tiny Stable-Diffusion- and SDXL-shaped pipelines saved with save_pretrained load by path through
the same ``load_diffusion`` / ``sample`` / ``capture_sites`` / ``replace_site`` API the papers
use, and sample what diffusers' own pipelines sample from the same noise."""

from __future__ import annotations

import pytest
import torch
from tiny_hub import save_tiny_sd

from common.models.diffusion import (
    capture_sites,
    ddim_scheduler,
    list_unet_sites,
    load_diffusion,
    replace_site,
    sample,
)

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_sd(tmp_path_factory.mktemp("tiny_sdxl"), sdxl=True)


def test_hub_pipeline_samples_through_the_vae(tiny_sd):
    model = load_diffusion(tiny_sd, class_names=["cat", "dog"])
    assert model.image_size == 16 and model.vae is not None
    assert model.encoder.added_conditioning(["a cat"]) is None
    captions = [model.caption(c) for c in range(2)]
    images = sample(model, captions, num_steps=2, seed=0)
    assert images.shape == (2, 3, 16, 16)
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    torch.testing.assert_close(images, sample(model, captions, num_steps=2, seed=0))


def _pipeline_images(pipeline_cls, folder, model, captions, guidance, steps=2):
    """diffusers' own pipeline from the same noise, DDIM (trailing, eta = 0), images in [0, 1]."""
    pipe = pipeline_cls.from_pretrained(folder, use_safetensors=True)
    pipe.scheduler = ddim_scheduler(model)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(len(captions), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe(
        captions, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
        output_type="pt", height=16, width=16,
    )  # fmt: skip
    return out.images


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sd_samples_match_the_diffusers_pipeline(tiny_sd, guidance):
    from diffusers import StableDiffusionPipeline

    model = load_diffusion(tiny_sd, class_names=["cat", "dog"])
    captions = ["a photo of a cat", "a photo of a dog"]
    ours = sample(model, captions, num_steps=2, guidance_scale=guidance, eta=0.0, seed=0)
    ref = _pipeline_images(StableDiffusionPipeline, tiny_sd, model, captions, guidance)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_sdxl_conditioning_and_samples_match_the_diffusers_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    model = load_diffusion(tiny_sdxl, class_names=["cat", "dog"])
    assert model.metadata["sdxl"] and model.encoder.dim == 32  # 16 + 16 hidden features
    emb, mask = model.encoder(["a cat", ""])
    assert emb.shape == (2, 77, 32) and bool(mask.all())
    extra = model.encoder.added_conditioning(["a cat", ""])
    assert extra["text_embeds"].shape == (2, 12)
    assert extra["time_ids"].tolist()[0] == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    # force_zeros_for_empty_prompt: the unconditional input of guidance is all zeros
    assert not emb[1].any() and not extra["text_embeds"][1].any() and emb[0].any()

    captions = ["a photo of a cat", "a photo of a dog"]
    for guidance in (1.0, 3.0):
        ours = sample(model, captions, num_steps=2, guidance_scale=guidance, eta=0.0, seed=0)
        ref = _pipeline_images(StableDiffusionXLPipeline, tiny_sdxl, model, captions, guidance)
        torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_sdxl_sites_capture_and_replace(tiny_sdxl):
    model = load_diffusion(tiny_sdxl, class_names=["cat", "dog"])
    site = list_unet_sites(model.unet)[0]
    with capture_sites(model.unet, [site]) as cap:
        before = sample(model, ["a photo of a cat"], num_steps=1, guidance_scale=1.0)
    assert cap.tokens(site).shape == (8 * 8, 8) and cap.timesteps(site).tolist()[0] == 999
    with replace_site(model.unet, site, lambda delta, t: torch.zeros_like(delta)):
        after = sample(model, ["a photo of a cat"], num_steps=1, guidance_scale=1.0)
    assert (after - before).abs().max() > 1e-6  # the block's update matters to the image


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
