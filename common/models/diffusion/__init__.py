"""A small text-to-image diffusion model that trains offline, its sampler and its hook sites.

No diffusion weights ship offline, so papers 17 (SAeUron) and 37 (one-step SAEs on SDXL Turbo) use
a stand-in for Stable Diffusion that has the same parts: a diffusers ``UNet2DConditionModel`` with
cross-attention transformer blocks over text-encoder token embeddings, the DDPM training loss, and
DDIM sampling with classifier-free guidance. It draws 16x16 Fashion-MNIST clothes from captions
such as "a photo of a sneaker"; ``common.models.classifier`` scores what it draws.

* Text: captions -> all-MiniLM-L6-v2 token embeddings c in R^{T x 384} (last hidden state, padded to
  ``max_tokens`` with an attention mask), cached per caption (``CaptionEncoder``). The empty
  caption "" is the unconditional input of classifier-free guidance, as in Stable Diffusion.
* Noise schedule: Stable Diffusion's (``scaled_linear``, beta from 0.00085 to 0.012, 1000 steps),
  epsilon prediction, pixels scaled to [-1, 1].
* Training (Ho et al., 2020), with the caption dropped for a fraction ``p_uncond`` of images
  (Ho & Salimans, 2022)::

      x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   L = E ||eps - eps_theta(x_t, t, c)||^2

* Sampling: DDIM (Song et al., 2021) with ``trailing`` timestep spacing, so 1-4 step sampling
  starts at t = 999 as SDXL Turbo does (paper 37), and guidance
  eps = eps_theta(x_t, t, "") + w (eps_theta(x_t, t, c) - eps_theta(x_t, t, "")).

Default budget (U-Net of 1.29M parameters, 1200 AdamW steps of 64 images, ~1.3 epochs): 402 CPU
seconds on one thread (13 min wall on a loaded 2-core box). Accuracy of the 16x16 classifier
(89% on real test images) on 16 samples per class, w = 3: 10 steps with eta = 1 (the default)
99%; 4 / 2 / 1 deterministic steps 97% / 99% / 85% (one step is saturated: x_0 is read off
t = 999). Half the budget (600 steps, 196 CPU s) already gives recognisable samples (10 steps,
eta = 1: 96%). More steps are *worse* at these budgets (eta = 0: 10 steps 70%, 50 steps 29%;
eta = 1: 20 steps 88%, 50 steps 68%): the model is least trained at low noise, and the errors of
many small steps accumulate (grey backgrounds, speckle); fresh noise (eta = 1) corrects part.

Hook sites (the same names work on Stable Diffusion's UNet): ``unet.<module path>`` of every
cross-attention ``Transformer2DModel``, e.g. ``unet.up_blocks.1.attentions.0``. The activation is
the block's *residual update* (paper 37)::

    delta = Transformer2DModel(h) - h        (B, C, H, W)

where h is the block's input feature map (the output of the ResNet block before it) and the output
already includes the block's internal skip connection (output = proj_out(transformer(proj_in(
norm(h)))) + h). Each spatial position of each image at each denoising step is one token
(B*H*W, C), recorded with its timestep (papers 17 and 37). ``capture_sites`` records them;
``replace_site`` swaps delta for f(delta, t) (SAE reconstructions, edited codes).

A Stable Diffusion 1.x/2.x or SDXL (Turbo) pipeline loads behind the same API by name,
``load_diffusion("stabilityai/sdxl-turbo", class_names=[...])`` (``hub``);
``common.models.scorers`` scores its images with CLIP zero-shot.

Modules, one job each: ``conditioning`` (captions -> cross-attention tokens), ``unet`` (the U-Net,
its schedule, save / ``load_diffusion``), ``training`` (``train_diffusion`` and its checkpoints),
``sampling`` (DDIM ``sample``, VAE decode, captions, ``save_grid``), ``hooks`` (``capture_sites``,
``replace_site`` on ``common.hooks``), ``store`` (captured tokens in the activation store),
``hub`` (Stable Diffusion / SDXL pipelines), ``cli``.

Command line::

    python -m common.models.diffusion train --out data/diffusion/unet --steps 1200 --seed 0 \
        --metrics metrics/diffusion.json
    python -m common.models.diffusion sample --model data/diffusion/unet \
        --classifier data/diffusion/classifier \
        --per-class 16 --steps 10 --out figures/diffusion
"""

from common.models.diffusion.cli import main
from common.models.diffusion.conditioning import (
    CAPTION_TEMPLATES,
    TEXT_ENCODER,
    CaptionEncoder,
    TextConditioner,
    check_captions,
)
from common.models.diffusion.hooks import (
    SITE_VALUES,
    UNetCallContext,
    UNetCapture,
    capture_sites,
    list_unet_sites,
    replace_site,
    resolve_unet_site,
)
from common.models.diffusion.hub import HubCaptionEncoder, is_hub_pipeline, load_hub_diffusion
from common.models.diffusion.sampling import (
    class_captions,
    ddim_scheduler,
    decode_latents,
    sample,
    save_grid,
)
from common.models.diffusion.store import UNetTokens, load_tokens, save_tokens
from common.models.diffusion.training import (
    DiffusionTrainConfig,
    ema_update_,
    lr_at,
    train_diffusion,
)
from common.models.diffusion.unet import (
    CHECKPOINT_FILE,
    MODEL_CARD,
    SCHEDULER_DIR,
    UNET_DIR,
    DiffusionModel,
    UNetConfig,
    build_unet,
    load_diffusion,
    noise_scheduler,
)

__all__ = [
    "CAPTION_TEMPLATES",
    "CHECKPOINT_FILE",
    "MODEL_CARD",
    "SCHEDULER_DIR",
    "SITE_VALUES",
    "TEXT_ENCODER",
    "UNET_DIR",
    "CaptionEncoder",
    "DiffusionModel",
    "DiffusionTrainConfig",
    "HubCaptionEncoder",
    "TextConditioner",
    "UNetCallContext",
    "UNetCapture",
    "UNetConfig",
    "UNetTokens",
    "build_unet",
    "capture_sites",
    "check_captions",
    "class_captions",
    "ddim_scheduler",
    "decode_latents",
    "ema_update_",
    "is_hub_pipeline",
    "list_unet_sites",
    "load_diffusion",
    "load_hub_diffusion",
    "load_tokens",
    "lr_at",
    "main",
    "noise_scheduler",
    "replace_site",
    "resolve_unet_site",
    "sample",
    "save_grid",
    "save_tokens",
    "train_diffusion",
]
