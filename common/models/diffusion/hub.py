"""Stable Diffusion from the hub behind the same interface as the small offline diffusion model.

The diffusion papers (17 SAeUron, 37 one-step SAEs) run offline on the pipeline's own 16x16 U-Net
(``common.models.diffusion``). On a machine with internet and a GPU the same notebooks and stages
take a Stable Diffusion pipeline by name:
``load_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5", class_names=[...])`` or
``load_diffusion("stabilityai/sdxl-turbo", class_names=[...])`` (any diffusers folder or hub id
with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/``, plus
``text_encoder_2/`` and ``tokenizer_2/`` for SDXL) returns a ``DiffusionModel`` whose ``encoder``
gives the pipeline's text conditioning and whose ``vae`` decodes the sampled latents:
images = VAE.decode(z_0 / scaling_factor).

Text conditioning, as the diffusers pipelines compute it:

* SD 1.x / 2.x: c = the CLIP text encoder's last hidden state over 77 padded tokens (N, 77, d).
* SDXL / SDXL Turbo (Podell et al., 2023): c = [h_1 ; h_2], the penultimate hidden states of
  both text encoders joined along features (N, 77, 768 + 1280), and two extra U-Net inputs
  (``added_cond_kwargs``): ``text_embeds``, the second encoder's pooled, projected embedding
  (N, 1280), and ``time_ids`` = (H, W, 0, 0, H, W), the original size, crop corner and target
  size. With ``force_zeros_for_empty_prompt`` (SDXL's default) the empty caption, the
  unconditional input of guidance, is all zeros.

Sampling, ``capture_sites`` and ``replace_site`` are unchanged: the sites are the same
``unet.<path>`` names of the cross-attention ``Transformer2DModel`` blocks (e.g.
``unet.up_blocks.1.attentions.0`` on SD 1.5; paper 37's ``down.2.1`` is
``unet.down_blocks.2.attentions.1`` on SDXL). SDXL Turbo samples in 1-4 steps without guidance
(``guidance_scale=1``).

Weights load with safetensors only, ``trust_remote_code`` is never used, and nothing is
downloaded unless ``allow_download=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.models.diffusion.conditioning import check_captions
from common.models.diffusion.unet import DiffusionModel

DEFAULT_TEMPLATES = ("a photo of a {}",)
SDXL_EMBED_TYPE = "text_time"  # UNet2DConditionModel.config.addition_embed_type of SDXL


class HubCaptionEncoder:
    """Captions -> a Stable Diffusion pipeline's text conditioning (see the module docstring).

    ``__call__`` gives the cross-attention input c (N, 77, d) and an all-ones mask (N, 77);
    ``added_conditioning`` gives SDXL's ``text_embeds`` and ``time_ids`` (None for SD 1.x/2.x).
    Each caption is encoded once and cached.
    """

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[torch.nn.Module],
        revision: str,
        *,
        sdxl: bool = False,
        image_size: int = 0,
        zero_empty_caption: bool = False,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("need one tokenizer per text encoder")
        if sdxl and (len(text_encoders) != 2 or image_size <= 0):
            raise ValueError("SDXL needs two text encoders and the image size (time_ids)")
        self.tokenizers = list(tokenizers)
        self.text_encoders = [enc.eval().requires_grad_(False) for enc in text_encoders]
        self.max_tokens = min(  # 77 for Stable Diffusion's CLIP
            min(int(tok.model_max_length) for tok in self.tokenizers),
            min(int(enc.config.max_position_embeddings) for enc in self.text_encoders),
        )
        self.sdxl, self.image_size = sdxl, image_size
        self.zero_empty_caption = zero_empty_caption
        self._revision = revision
        self._cache: dict[str, tuple[Tensor, Tensor | None]] = {}

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def dim(self) -> int:
        return sum(int(enc.config.hidden_size) for enc in self.text_encoders)

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        """Hidden states (N, T, d) and, for SDXL, pooled embeddings (N, d_pool) of new captions."""
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                captions,
                padding="max_length",
                max_length=self.max_tokens,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(encoder.parameters()).device
            out = encoder(ids.to(device), output_hidden_states=self.sdxl)
            if self.sdxl:
                states.append(out.hidden_states[-2])  # SDXL reads the penultimate layer
                if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds come first
                    pooled = out[0].float().cpu()
            else:
                states.append(out[0])  # last_hidden_state
        if self.sdxl and pooled is None:
            raise ValueError(
                "SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled output)"
            )
        return torch.cat(states, dim=-1).float().cpu(), pooled

    def _fill(self, captions: Sequence[str]) -> None:
        check_captions(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if not missing:
            return
        hidden, pooled = self._encode(missing)
        for i, caption in enumerate(missing):
            h, p = hidden[i].clone(), None if pooled is None else pooled[i].clone()
            if caption == "" and self.zero_empty_caption:
                h, p = torch.zeros_like(h), None if p is None else torch.zeros_like(p)
            self._cache[caption] = (h, p)

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        self._fill(captions)
        emb = torch.stack([self._cache[c][0] for c in captions])
        return emb, torch.ones(emb.shape[:2])

    def added_conditioning(self, captions: Sequence[str]) -> dict[str, Tensor] | None:
        """SDXL's ``text_embeds`` (N, d_pool) and ``time_ids`` (N, 6); None for SD 1.x / 2.x."""
        if not self.sdxl:
            return None
        self._fill(captions)
        text_embeds = torch.stack([self._cache[c][1] for c in captions])  # type: ignore[misc]
        s = float(self.image_size)
        time_ids = torch.tensor([s, s, 0.0, 0.0, s, s]).expand(len(captions), 6).clone()
        return {"text_embeds": text_embeds, "time_ids": time_ids}


def is_hub_pipeline(spec: str | Path) -> bool:
    """True for a diffusers pipeline folder (``model_index.json``) or a hub id ("org/name")."""
    path = Path(spec)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return "/" in str(spec) and not path.exists() and not str(spec).startswith((".", "/"))


def _check_sdxl_sizes(unet: torch.nn.Module, pooled_dim: int, spec: str | Path) -> None:
    """The U-Net's added embedding must take 6 time ids and the pooled text (as SDXL's)."""
    expected = int(unet.add_embedding.linear_1.in_features)  # type: ignore[union-attr]
    given = 6 * int(unet.config.addition_time_embed_dim) + pooled_dim
    if expected != given:
        raise ValueError(
            f"{spec}: the U-Net's added embedding takes {expected} inputs, but 6 time ids and a "
            f"{pooled_dim}-d pooled text embedding give {given}; the pipeline is not SDXL-shaped"
        )


def load_hub_diffusion(
    spec: str | Path,
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    allow_download: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """A Stable Diffusion 1.x / 2.x or SDXL pipeline as a ``DiffusionModel`` (frozen, eval mode).

    ``class_names`` are the concepts the papers prompt for ("a photo of a {class}"); the 16x16
    model stores them in its card, a hub pipeline has none, so they come from the caller (params).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not class_names:
        raise ValueError(
            f"a hub pipeline ({spec}) needs class_names (the concepts to prompt for, e.g. the "
            "paper's `class_names` parameter)"
        )
    common = {"local_files_only": not allow_download}
    try:
        index = DiffusionPipeline.load_config(str(spec), **common)
        unet = UNet2DConditionModel.from_pretrained(
            spec, subfolder="unet", use_safetensors=True, torch_dtype=dtype, **common
        )
    except OSError as err:
        raise OSError(
            f"could not load the diffusers pipeline {str(spec)!r} "
            f"({'from the hub' if allow_download else 'from the local Hugging Face cache'}): "
            f"{err}. Fetch it once on a machine with internet (allow_download=True), or pass "
            "a local folder with model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/"
        ) from err
    sdxl = unet.config.get("addition_embed_type") == SDXL_EMBED_TYPE
    # SDXL's VAE overflows in float16 (force_upcast): decode in float32 then.
    vae_dtype = (
        torch.float32
        if AutoencoderKL.load_config(spec, subfolder="vae", **common).get("force_upcast", False)
        else dtype
    )
    vae = AutoencoderKL.from_pretrained(
        spec, subfolder="vae", use_safetensors=True, torch_dtype=vae_dtype, **common
    )
    kinds = [("text_encoder", "tokenizer", CLIPTextModel)]
    if sdxl:
        kinds.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
    encoders, tokenizers = [], []
    for encoder_dir, tokenizer_dir, cls in kinds:
        encoders.append(
            cls.from_pretrained(
                spec, subfolder=encoder_dir, use_safetensors=True, torch_dtype=dtype, **common
            )
        )
        tokenizers.append(CLIPTokenizer.from_pretrained(spec, subfolder=tokenizer_dir, **common))
    scheduler = DDPMScheduler.from_pretrained(spec, subfolder="scheduler", **common)
    for module in (unet, vae, *encoders):
        module.to(device).eval().requires_grad_(False)
    image_size = int(unet.config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    if sdxl:
        _check_sdxl_sizes(unet, int(encoders[1].config.projection_dim), spec)
    encoder = HubCaptionEncoder(
        tokenizers,
        encoders,
        f"{spec}@diffusers-{index.get('_diffusers_version', '?')}",
        sdxl=sdxl,
        image_size=image_size,
        zero_empty_caption=sdxl and bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    return DiffusionModel(
        unet=unet,
        scheduler=scheduler,
        encoder=encoder,
        class_names=tuple(class_names),
        templates=tuple(templates),
        metadata={"source": str(spec), "pipeline": index.get("_class_name", "?"), "sdxl": sdxl},
        vae=vae,
    )
