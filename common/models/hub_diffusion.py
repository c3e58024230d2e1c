"""Stable Diffusion from the hub behind the same interface as the small offline diffusion model.

The diffusion papers (17 SAeUron, 37 one-step SAEs) run offline on the pipeline's own 16x16 U-Net
(``common.models.diffusion``). On a machine with internet and a GPU the same notebooks and stages
take a Stable Diffusion pipeline by name: ``load_diffusion("runwayml/stable-diffusion-v1-5")``
(any diffusers folder or hub id with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and
``scheduler/``) returns a ``DiffusionModel`` whose

* ``encoder`` is the pipeline's CLIP text encoder (last hidden state over 77 padded tokens, all
  attended, as Stable Diffusion was trained), and
* ``vae`` decodes the sampled latents: images = VAE.decode(z_0 / scaling_factor).

Sampling, ``capture_sites`` and ``replace_site`` are unchanged: the sites are the same
``unet.<path>`` names of the cross-attention ``Transformer2DModel`` blocks (e.g.
``unet.up_blocks.1.attentions.0`` on SD 1.5; paper 37's ``down.2.1`` is
``unet.down_blocks.2.attentions.1`` on SDXL). SDXL-style U-Nets, whose cross-attention also
needs pooled text embeddings and size conditioning (``addition_embed_type = "text_time"``), are
refused with a clear message: only the SD 1.x / 2.x conditioning is built here.

Weights load with safetensors only, ``trust_remote_code`` is never used, and nothing is
downloaded unless ``allow_download=True``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

DEFAULT_TEMPLATES = ("a photo of a {}",)


class HubCaptionEncoder:
    """Captions -> CLIP text-encoder hidden states (N, 77, d) and an all-ones mask (N, 77)."""

    def __init__(self, tokenizer: object, text_encoder: torch.nn.Module, revision: str) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.max_tokens = min(  # 77 for Stable Diffusion's CLIP
            int(tokenizer.model_max_length),  # type: ignore[attr-defined]
            int(text_encoder.config.max_position_embeddings),
        )
        self._revision = revision
        self._cache: dict[str, Tensor] = {}

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f"captions must be a list of strings, got {captions!r}")
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            ids = self.tokenizer(  # type: ignore[operator]
                missing,
                padding="max_length",
                max_length=self.max_tokens,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            device = next(self.text_encoder.parameters()).device
            hidden = self.text_encoder(ids.to(device))[0].float().cpu()
            for i, caption in enumerate(missing):
                self._cache[caption] = hidden[i].clone()
        emb = torch.stack([self._cache[c] for c in captions])
        return emb, torch.ones(emb.shape[:2])


def is_hub_pipeline(spec: str | Path) -> bool:
    """True for a diffusers pipeline folder (``model_index.json``) or a hub id ("org/name")."""
    path = Path(spec)
    if path.is_dir():
        return (path / "model_index.json").is_file()
    return "/" in str(spec) and not path.exists() and not str(spec).startswith((".", "/"))


def load_hub_diffusion(
    spec: str | Path,
    class_names: Sequence[str],
    *,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    allow_download: bool = False,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
):  # -> DiffusionModel (imported lazily: diffusion.py imports this module)
    """A Stable Diffusion 1.x / 2.x pipeline as a ``DiffusionModel`` (frozen, eval mode).

    ``class_names`` are the concepts the papers prompt for ("a photo of a {class}"); the 16x16
    model stores them in its card, a hub pipeline has none, so they come from the caller (params).
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from common.models.diffusion import DiffusionModel

    if not class_names:
        raise ValueError("a hub pipeline needs class_names (the concepts to prompt for)")
    common = {"local_files_only": not allow_download}
    try:
        unet = UNet2DConditionModel.from_pretrained(
            spec, subfolder="unet", use_safetensors=True, torch_dtype=dtype, **common
        )
    except OSError as err:
        raise OSError(
            f"could not load the diffusers pipeline {str(spec)!r} "
            f"({'from the hub' if allow_download else 'from the local Hugging Face cache'}): "
            f"{err}. Fetch it once on a machine with internet (allow_download=True), or pass "
            "a local folder with unet/, vae/, text_encoder/, tokenizer/, scheduler/"
        ) from err
    if unet.config.get("addition_embed_type") == "text_time":
        raise NotImplementedError(
            f"{spec} is an SDXL-style U-Net (pooled text embeddings + size conditioning); only "
            "SD 1.x / 2.x pipelines (one CLIP text encoder) are supported"
        )
    vae = AutoencoderKL.from_pretrained(
        spec, subfolder="vae", use_safetensors=True, torch_dtype=dtype, **common
    )
    text_encoder = CLIPTextModel.from_pretrained(
        spec, subfolder="text_encoder", use_safetensors=True, torch_dtype=dtype, **common
    )
    tokenizer = CLIPTokenizer.from_pretrained(spec, subfolder="tokenizer", **common)
    scheduler = DDPMScheduler.from_pretrained(spec, subfolder="scheduler", **common)
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    revision = str(spec)
    index = Path(spec) / "model_index.json"
    if index.is_file():
        revision = json.loads(index.read_text()).get("_diffusers_version", revision)
    return DiffusionModel(
        unet=unet,
        scheduler=scheduler,
        encoder=HubCaptionEncoder(tokenizer, text_encoder, revision),  # type: ignore[arg-type]
        class_names=tuple(class_names),
        templates=tuple(templates),
        metadata={"source": str(spec)},
        vae=vae,
    )
