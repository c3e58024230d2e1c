"""Drawing images: DDIM sampling with classifier-free guidance (``sample``), the VAE decode of a
hub pipeline's latents, class captions, and PNG grids (``save_grid``).

DDIM (Song et al., 2021) with ``trailing`` timestep spacing, so 1-4 step sampling starts at
t = 999 as SDXL Turbo does (paper 37), and guidance

    eps = eps_theta(x_t, t, "") + w (eps_theta(x_t, t, c) - eps_theta(x_t, t, "")).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler
from torch import Tensor, nn

from common.models.diffusion.hooks import captions_of_rows
from common.models.diffusion.unet import DiffusionModel


def ddim_scheduler(model: DiffusionModel) -> DDIMScheduler:
    """DDIM over the training schedule; ``trailing`` spacing so any step count starts at t=T-1."""
    return DDIMScheduler.from_config(model.scheduler.config, timestep_spacing="trailing")


@torch.no_grad()
def sample(
    model: DiffusionModel,
    captions: Sequence[str],
    *,
    num_steps: int = 10,
    guidance_scale: float = 3.0,
    eta: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
    callback: Callable[[int, int, Tensor], None] | None = None,
) -> Tensor:
    """Images (N, C, S, S) in [0, 1] (on the CPU) for N captions: DDIM with guidance (C = 1 for
    the 16x16 model, 3 for a hub Stable Diffusion pipeline, whose latents the VAE decodes).

    ``eta`` = 0 is the deterministic DDIM update; eta = 1 adds fresh noise at each step with the
    DDPM posterior variance (Song et al., 2021, eq. 16), which corrects errors of an imperfect
    model better when there are many steps. All noise comes from ``seed``.
    ``guidance_scale`` w > 1 runs the U-Net on [unconditional; conditional] rows in one batch
    (rows 0..n-1 use "", rows n..2n-1 the captions: see ``capture_sites``); w = 1 runs the
    conditional rows only. Hooks learn which caption each row draws (``UNetCapture.captions``,
    ``replace_site(per_caption=True)``), so edits and captures need no particular batching.
    All noise is drawn up front, so results do not depend on ``batch_size`` (up to float
    rounding). ``callback(step_index, t, x_t)`` is called after each step of each batch; hooks
    from ``capture_sites`` / ``replace_site`` see every U-Net call.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= eta <= 1:
        raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta}")
    if guidance_scale < 1:
        raise ValueError(f"guidance_scale must be >= 1 (1 = no guidance), got {guidance_scale}")
    unet = model.unet.eval()
    param = next(unet.parameters())
    device, dtype = param.device, param.dtype
    size, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), channels, size, size, generator=gen)
    step_noise = torch.randn(num_steps, *noise.shape, generator=gen) if eta > 0 else None
    cond_all, cond_mask_all = model.encoder(list(captions))
    null, null_mask = model.encoder([""])
    # SDXL also takes pooled text embeddings and size ids per row (None for other U-Nets).
    extra_all = model.encoder.added_conditioning(list(captions))
    extra_null = model.encoder.added_conditioning([""])
    use_cfg = guidance_scale > 1

    def rows(cond: Tensor, uncond: Tensor, lo: int, n: int) -> Tensor:
        """Rows lo..lo+n of the captions' conditioning, after n unconditional rows with CFG."""
        part = cond[lo : lo + n]
        if use_cfg:
            part = torch.cat([uncond.expand(n, *uncond.shape[1:]), part])
        return part.to(device, dtype)

    out = []
    for lo in range(0, len(captions), batch_size):
        x = noise[lo : lo + batch_size].to(device, dtype)
        n = len(x)
        cond = rows(cond_all, null, lo, n)
        cond_mask = rows(cond_mask_all, null_mask, lo, n)
        added = None
        if extra_all is not None and extra_null is not None:
            added = {key: rows(extra_all[key], extra_null[key], lo, n) for key in extra_all}
        scheduler = ddim_scheduler(model)
        scheduler.set_timesteps(num_steps)
        caption_of_row = torch.arange(lo, lo + n)
        if use_cfg:
            caption_of_row = torch.cat([torch.full((n,), -1), caption_of_row])
        for i, t in enumerate(scheduler.timesteps):
            x_in = torch.cat([x, x]) if use_cfg else x
            with captions_of_rows(caption_of_row):
                eps = unet(
                    x_in, t, cond, encoder_attention_mask=cond_mask, added_cond_kwargs=added
                ).sample
            if use_cfg:
                eps_null, eps_cond = eps.chunk(2)
                eps = eps_null + guidance_scale * (eps_cond - eps_null)
            if step_noise is not None:
                z = step_noise[i, lo : lo + n].to(device, dtype)
                x = scheduler.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
            else:
                x = scheduler.step(eps, t, x).prev_sample
            if callback is not None:
                callback(i, int(t), x)
        if model.vae is not None:  # latent diffusion: decode z_0 to pixels in [-1, 1]
            x = decode_latents(model.vae, x)
        out.append(x.float().cpu())
    return (torch.cat(out).clamp(-1, 1) + 1) / 2


@torch.no_grad()
def decode_latents(vae: nn.Module, z: Tensor, batch_size: int = 8) -> Tensor:
    """x = VAE.decode(z / scaling_factor), in chunks (a decoder's activations at full resolution
    are large): pixels in about [-1, 1], on the CPU."""
    scale = vae.config.scaling_factor
    return torch.cat(
        [
            vae.decode(z[i : i + batch_size].to(vae.dtype) / scale).sample.float().cpu()
            for i in range(0, len(z), batch_size)
        ]
    )


def class_captions(model: DiffusionModel, per_class: int, template: int = 0) -> list[str]:
    """``per_class`` copies of each class caption, class-major (class 0 first)."""
    return [
        model.caption(c, template) for c in range(len(model.class_names)) for _ in range(per_class)
    ]


def save_grid(
    images: Tensor, rows: int, path: str | Path, labels: Sequence[str] = (), scale: int = 3
) -> None:
    """Write images (N, C, S, S) in [0, 1] (C = 1 grey, 3 RGB) as a PNG grid of ``rows`` rows,
    labels on the left; each image is enlarged ``scale`` times (nearest neighbour)."""
    from PIL import Image, ImageDraw

    n, channels, s, _ = images.shape
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(images.shape)}")
    mode = "L" if channels == 1 else "RGB"
    cols = math.ceil(n / rows)
    label_w = 80 if labels else 0
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    canvas = Image.new(mode, (label_w + cols * (s * scale + 1), rows * (s * scale + 1)))
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(pixels[i].squeeze(-1).numpy(), mode)
        tile = tile.resize((s * scale, s * scale), Image.NEAREST)
        canvas.paste(tile, (label_w + c * (s * scale + 1), r * (s * scale + 1)))
    draw = ImageDraw.Draw(canvas)
    white = 255 if channels == 1 else (255, 255, 255)
    for r, text in enumerate(labels[:rows]):
        draw.text((2, r * (s * scale + 1) + s * scale // 3), text, fill=white)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
