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
``load_diffusion("stabilityai/sdxl-turbo", class_names=[...])`` (``common.models.hub_diffusion``);
``common.models.scorers`` scores its images with CLIP zero-shot.

Command line::

    python -m common.models.diffusion train --out data/diffusion/unet --steps 1200 --seed 0 \
        --metrics metrics/diffusion.json
    python -m common.models.diffusion sample --model data/diffusion/unet \
        --classifier data/diffusion/classifier \
        --per-class 16 --steps 10 --out figures/diffusion
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from diffusers import DDIMScheduler, DDPMScheduler, Transformer2DModel, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.hooks import tokens_from
from common.models.loading import LoadedModel, load_model

CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {} on a plain background",
)
TEXT_ENCODER = "minilm-l6"
UNET_DIR, SCHEDULER_DIR, CHECKPOINT_FILE, MODEL_CARD = (
    "unet",
    "scheduler",
    "checkpoint.safetensors",
    "diffusion.json",
)
SITE_PREFIX = "unet."
MACHINE_DEPENDENT = ("loss_curve", "wall_s", "cpu_s", "torch_threads", "steps_this_run")


# --- text conditioning ---------------------------------------------------------------------------
def check_captions(captions: Sequence[str]) -> None:
    """Raise a TypeError unless ``captions`` is a list of strings (not one bare string)."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of strings, got {captions!r}")


class TextConditioner(Protocol):
    """What the U-Net is conditioned on, per caption: ``CaptionEncoder`` (MiniLM, the 16x16
    model) or ``hub_diffusion.HubCaptionEncoder`` (a Stable Diffusion pipeline's CLIP encoders).

    ``__call__`` gives the cross-attention input (N, T, d) and its mask (N, T);
    ``added_conditioning`` the U-Net's extra inputs (SDXL's ``text_embeds``, ``time_ids``) or None.
    """

    max_tokens: int

    @property
    def revision(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]: ...

    def added_conditioning(self, captions: Sequence[str]) -> dict[str, Tensor] | None: ...


class CaptionEncoder:
    """Captions -> MiniLM token embeddings c (T x 384, last hidden state) and attention mask m.

    Every caption is padded to ``max_tokens`` tokens ([CLS] ... [SEP] [PAD]...); m marks the real
    tokens, and cross-attention ignores the padding. Embeddings are computed once per caption and
    cached. MiniLM is loaded on first use unless ``text_model`` is given.
    """

    def __init__(self, text_model: LoadedModel | None = None, max_tokens: int = 16) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
        self._text_model = text_model
        self.max_tokens = max_tokens
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def text_model(self) -> LoadedModel:
        if self._text_model is None:
            self._text_model = load_model(TEXT_ENCODER)
        return self._text_model

    @property
    def revision(self) -> str:
        return self.text_model.revision

    @property
    def dim(self) -> int:
        return int(self.text_model.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(len(captions), max_tokens, 384) embeddings and a (len(captions), max_tokens) mask."""
        check_captions(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            tokenizer, model = self.text_model.tokenizer, self.text_model.model
            lengths = [len(ids) for ids in tokenizer(missing)["input_ids"]]
            too_long = [c for c, n in zip(missing, lengths) if n > self.max_tokens]
            if too_long:
                raise ValueError(
                    f"captions longer than max_tokens={self.max_tokens} tokens: {too_long}; "
                    "shorten them or build the model with a larger max_tokens"
                )
            batch = tokenizer(
                missing, padding="max_length", max_length=self.max_tokens, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state.float()
            for i, caption in enumerate(missing):
                self._cache[caption] = (hidden[i].clone(), batch["attention_mask"][i].float())
        emb = torch.stack([self._cache[c][0] for c in captions])
        mask = torch.stack([self._cache[c][1] for c in captions])
        return emb, mask

    def added_conditioning(self, captions: Sequence[str]) -> dict[str, Tensor] | None:
        """Extra U-Net inputs per caption (SDXL's pooled text and size ids); none here."""
        return None


# --- the model ------------------------------------------------------------------------------------
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
    such as ``stabilityai/sdxl-turbo``) loads through ``common.models.hub_diffusion`` instead;
    it needs ``class_names`` (the concepts to prompt for) and downloads only with
    ``allow_download=True``.
    """
    from common.models.hub_diffusion import is_hub_pipeline, load_hub_diffusion

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


# --- training -------------------------------------------------------------------------------------
@dataclass
class DiffusionTrainConfig:
    """Budget and optimiser of ``train_diffusion`` (AdamW, warm-up then cosine decay, EMA)."""

    steps: int = 1200
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    seed: int = 0
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}")
        if not 0 <= self.p_uncond < 1:
            raise ValueError(f"`p_uncond` must be in [0, 1), got {self.p_uncond}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}")


def lr_at(step: int, cfg: DiffusionTrainConfig) -> float:
    """lr * min(1, (t+1)/warmup) * (1 + cos(pi * progress)) / 2, progress over the post-warmup."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, max(0, step - cfg.warmup_steps) / span)
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, step: int, decay: float) -> None:
    """theta_ema <- d theta_ema + (1 - d) theta with d = min(decay, (1 + t) / (10 + t))."""
    d = min(decay, (1 + step) / (10 + step))
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1 - d)


def _step_generator(seed: int, step: int) -> torch.Generator:
    """Everything random in step t (batch, captions, dropout, t, noise) comes from (seed, t)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _save_checkpoint(
    path: Path,
    unet: nn.Module,
    ema: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    run: dict[str, Any],
) -> None:
    """Raw and EMA weights, AdamW moments, the step and the run's configs, written atomically."""
    tensors = {f"model::{k}": v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    tensors |= {f"ema::{k}": v.detach().cpu().clone() for k, v in ema.state_dict().items()}
    for name, p in unet.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            tensors[f"opt::{name}::{key}"] = torch.as_tensor(value).detach().cpu().clone()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "run": json.dumps(run)})
    os.replace(tmp, path)


def _load_checkpoint(
    path: Path, unet: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, run: dict[str, Any]
) -> int:
    """Restore a checkpoint written by the same run configuration; return its step."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    saved = json.loads(meta["run"])
    if saved != run:
        diff = {k: (saved.get(k), run.get(k)) for k in run if saved.get(k) != run.get(k)}
        raise ValueError(
            f"{path} was written by a run with other settings (saved, now): {diff}; pass "
            "--no-resume (resume=False) to start afresh, or use another --out"
        )
    device = next(unet.parameters()).device
    tensors = load_file(str(path), device=str(device))

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    unet.load_state_dict(part("model::"))
    ema.load_state_dict(part("ema::"))
    moments = part("opt::")
    for name, p in unet.named_parameters():
        state = {k.split("::")[1]: v for k, v in moments.items() if k.split("::")[0] == name}
        if state:
            opt.state[p] = state
    return int(meta["step"])


def train_diffusion(
    images: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    out_dir: str | Path,
    *,
    unet_cfg: UNetConfig | None = None,
    cfg: DiffusionTrainConfig | None = None,
    encoder: CaptionEncoder | None = None,
    templates: Sequence[str] = CAPTION_TEMPLATES,
    resume: bool = True,
    stop_after: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[DiffusionModel, dict[str, Any]]:
    """Train eps_theta with the DDPM loss (module docstring) on ``images`` (N, 1, S, S) in [0, 1].

    Image i is captioned with a random template of class ``labels[i]``, or with "" with
    probability ``p_uncond``. Batches are drawn with replacement. The returned model (saved to
    ``out_dir``) holds the EMA weights. ``out_dir/checkpoint.safetensors`` (raw and EMA weights,
    AdamW moments, step) lets a stopped run resume to the same result; ``stop_after`` stops
    early with a checkpoint (to test that). A checkpoint from other settings is refused.
    """
    unet_cfg, cfg = unet_cfg or UNetConfig(), cfg or DiffusionTrainConfig()
    encoder = encoder or CaptionEncoder()
    if encoder.dim != unet_cfg.cross_attention_dim:
        raise ValueError(
            f"the text encoder gives {encoder.dim}-d tokens but cross_attention_dim is "
            f"{unet_cfg.cross_attention_dim}; set UNetConfig(cross_attention_dim={encoder.dim})"
        )
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[-1] != unet_cfg.image_size:
        raise ValueError(
            f"images must be (N, 1, {unet_cfg.image_size}, {unet_cfg.image_size}) in [0, 1], got "
            f"{tuple(images.shape)}; resize with common.data.images.resize"
        )
    if len(labels) != len(images) or int(labels.max()) >= len(class_names):
        raise ValueError("labels must have one entry per image, each < len(class_names)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x0_all = images.float() * 2 - 1  # [0, 1] -> [-1, 1]

    # Caption bank: (classes, templates, T, D) and the unconditional "" embedding.
    n_cls, n_tmpl = len(class_names), len(templates)
    captions = [t.format(c) for c in class_names for t in templates]
    emb, mask = encoder(captions)
    emb = emb.view(n_cls, n_tmpl, *emb.shape[1:])
    mask = mask.view(n_cls, n_tmpl, -1)
    null_emb, null_mask = encoder([""])

    torch.manual_seed(cfg.seed)
    unet = build_unet(unet_cfg).to(device)
    ema = build_unet(unet_cfg).to(device)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    scheduler = noise_scheduler()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = {  # compared with the checkpoint's copy after a JSON round trip
        "unet_config": asdict(unet_cfg),
        "train_config": {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
        "class_names": list(class_names),
        "templates": list(templates),
        "n_train_images": len(images),
        "text_encoder_revision": encoder.revision,
    }
    run = json.loads(json.dumps(run))
    ckpt = out_dir / CHECKPOINT_FILE
    start = _load_checkpoint(ckpt, unet, ema, opt, run) if resume and ckpt.is_file() else 0

    losses: list[float] = []
    wall0, cpu0 = time.perf_counter(), time.process_time()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    unet.train()
    bar = tqdm(
        range(start, end), desc="diffusion", disable=not progress, initial=start, total=cfg.steps
    )
    for step in bar:
        g = _step_generator(cfg.seed, step)
        idx = torch.randint(len(x0_all), (cfg.batch_size,), generator=g)
        tmpl = torch.randint(n_tmpl, (cfg.batch_size,), generator=g)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        t = torch.randint(scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        x0 = x0_all[idx]
        noise = torch.randn(x0.shape, generator=g)
        cond = emb[labels[idx], tmpl]
        cond_mask = mask[labels[idx], tmpl]
        cond[drop], cond_mask[drop] = null_emb[0], null_mask[0]

        x_t = scheduler.add_noise(x0, noise, t)
        x_t, t, cond, cond_mask, noise = (v.to(device) for v in (x_t, t, cond, cond_mask, noise))
        pred = unet(x_t, t, cond, encoder_attention_mask=cond_mask).sample
        loss = nn.functional.mse_loss(pred, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {step}; lower --lr (now {cfg.lr}). The last "
                f"checkpoint ({ckpt}) is intact."
            )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        ema_update_(ema, unet, step, cfg.ema_decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save_checkpoint(ckpt, unet, ema, opt, step + 1, run)

    ema.eval()
    n = min(100, len(losses))
    metrics: dict[str, Any] = {
        "steps": cfg.steps,
        "steps_this_run": end - start,
        "batch_size": cfg.batch_size,
        "n_train_images": len(images),
        "n_params": sum(p.numel() for p in unet.parameters()),
        "wall_s": round(time.perf_counter() - wall0, 1),
        "cpu_s": round(time.process_time() - cpu0, 1),
        "torch_threads": torch.get_num_threads(),
        "loss_first_100": sum(losses[:n]) / n if n else None,
        "loss_last_100": sum(losses[-n:]) / n if n else None,
        "loss_curve": [
            sum(losses[i : i + 50]) / len(losses[i : i + 50]) for i in range(0, len(losses), 50)
        ],
    }
    model = DiffusionModel(
        unet=ema,
        scheduler=scheduler,
        encoder=encoder,
        class_names=tuple(class_names),
        templates=tuple(templates),
        metadata={
            "unet_config": asdict(unet_cfg),
            "train_config": asdict(cfg),
            # Timings stay in the metrics file: the saved model is then the same bytes for the
            # same weights, and DVC skips what depends on it when a rerun changes nothing.
            "train_metrics": {k: v for k, v in metrics.items() if k not in MACHINE_DEPENDENT},
        },
    )
    if end == cfg.steps:
        model.save(out_dir)
    return model, metrics


# --- sampling -------------------------------------------------------------------------------------
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
            with _captions_of_rows(caption_of_row):
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


# --- hook sites -----------------------------------------------------------------------------------
# Index (into ``sample``'s captions) of the caption each row of the U-Net call in progress draws,
# -1 for the unconditional rows of guidance; None outside ``sample``.
_CALL_CAPTIONS: ContextVar[Tensor | None] = ContextVar("call_captions", default=None)


@contextmanager
def _captions_of_rows(caption_of_row: Tensor) -> Iterator[None]:
    token = _CALL_CAPTIONS.set(caption_of_row)
    try:
        yield
    finally:
        _CALL_CAPTIONS.reset(token)


def _token_captions(site: str, batch: int, positions: int) -> Tensor:
    """(batch * positions,) caption index of every token of the U-Net call in progress."""
    caption_of_row = _CALL_CAPTIONS.get()
    if caption_of_row is None or len(caption_of_row) != batch:
        raise RuntimeError(
            f"{site}: captions of the rows are only known while `sample` calls the U-Net; call "
            "`sample` inside the `with` block (or do not ask for captions)"
        )
    return caption_of_row.repeat_interleave(positions)


_GROUP_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def list_unet_sites(unet: nn.Module) -> list[str]:
    """``unet.<path>`` of every cross-attention ``Transformer2DModel``, in forward order."""
    names = [name for name, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    names.sort(key=lambda name: _GROUP_ORDER.get(name.split(".")[0], 3))  # stable within a group
    return [SITE_PREFIX + name for name in names]


def resolve_unet_site(unet: nn.Module, site: str) -> Transformer2DModel:
    """The ``Transformer2DModel`` named by ``site``; an unknown name lists the valid ones."""
    valid = list_unet_sites(unet)
    if site not in valid:
        close = difflib.get_close_matches(str(site), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown U-Net site {site!r}.{hint} Valid sites: {', '.join(valid)}")
    return unet.get_submodule(site[len(SITE_PREFIX) :])


class _TimestepTracker:
    """Remembers the per-row timesteps (B,) of the U-Net call in progress (a forward pre-hook)."""

    def __init__(self, unet: nn.Module) -> None:
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.calls = -1
        self.handle = unet.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).flatten().long().cpu()
        self.timesteps = t.expand(x.shape[0]) if t.numel() == 1 else t
        self.calls += 1

    def per_token(self, batch: int, positions: int) -> Tensor:
        if len(self.timesteps) != batch:
            raise RuntimeError(
                "a site ran outside a U-Net call (or with another batch size): call the whole "
                "UNet2DConditionModel inside the hook's `with` block"
            )
        return self.timesteps.repeat_interleave(positions)


def _block_io(args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> tuple[Tensor, Tensor]:
    """(input h, output) feature maps of a Transformer2DModel call."""
    h = args[0] if args else kwargs["hidden_states"]
    y = output[0] if isinstance(output, tuple) else output.sample
    return h, y


SITE_VALUES = ("update", "output")


def _check_value(value: str) -> None:
    if value not in SITE_VALUES:
        raise ValueError(
            f"value must be 'update' (delta = block(h) - h, paper 37) or 'output' (block(h), the "
            f"feature map SAeUron reads), got {value!r}"
        )


def _with_output(output: Any, y: Tensor) -> Any:
    if isinstance(output, tuple):
        return (y, *output[1:])
    output.sample = y
    return output


@dataclass
class SiteRecord:
    """Residual updates of one site over U-Net calls, as tokens (see ``UNetCapture``)."""

    chunks: list[Tensor] = field(default_factory=list)  # (B*H*W, C) per call
    timesteps: list[Tensor] = field(default_factory=list)  # (B*H*W,)
    rows: list[Tensor] = field(default_factory=list)  # (B*H*W,) batch row within the call
    captions: list[Tensor | None] = field(default_factory=list)  # (B*H*W,) caption index, or None
    calls: list[int] = field(default_factory=list)
    shape: tuple[int, int, int] | None = None  # (C, H, W)


class UNetCapture:
    """Records delta = block(h) - h (or block(h) with ``value="output"``) at U-Net sites.

    Every U-Net call inside ``with`` is recorded. Token order within a call is (row, y, x),
    row-major, as ``tokens_from`` makes it. Per site:
    ``tokens`` (N, C), ``timesteps`` (N,) the diffusion timestep of each token, ``rows`` (N,)
    the batch row within its U-Net call (during guided sampling rows < n are the unconditional
    half), ``captions`` (N,) the index of the caption (of ``sample``) each token's row draws, -1
    for the unconditional rows, ``calls`` (N,) the index of the U-Net call (the denoising step
    when sampling one batch).
    ``keep(site, t)`` (optional) filters whole calls by timestep, to save memory.
    """

    def __init__(
        self,
        unet: nn.Module,
        sites: Sequence[str],
        keep: Callable[[str, Tensor], bool] | None = None,
        value: str = "update",
    ) -> None:
        _check_value(value)
        self.value = value
        self.modules = {s: resolve_unet_site(unet, s) for s in sites}
        self.records = {s: SiteRecord() for s in sites}
        self.keep = keep
        self._unet = unet
        self._handles: list[Any] = []
        self._tracker: _TimestepTracker | None = None

    def __enter__(self) -> UNetCapture:
        self._tracker = _TimestepTracker(self._unet)
        for site, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(site), with_kwargs=True))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._tracker is not None:
            self._tracker.handle.remove()

    def _hook(self, site: str) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            assert self._tracker is not None
            h, y = _block_io(args, kwargs, output)
            b, c, hh, ww = y.shape
            t = self._tracker.per_token(b, hh * ww)
            if self.keep is not None and not self.keep(site, t):
                return
            rec = self.records[site]
            v = (y - h if self.value == "update" else y).detach()
            rec.chunks.append(tokens_from(v, "spatial").reshape(-1, c).cpu())
            rec.timesteps.append(t)
            rec.rows.append(torch.arange(b).repeat_interleave(hh * ww))
            known = _CALL_CAPTIONS.get() is not None
            rec.captions.append(_token_captions(site, b, hh * ww) if known else None)
            rec.calls.append(self._tracker.calls)
            rec.shape = (c, hh, ww)

        return hook

    def _record(self, site: str) -> SiteRecord:
        if site not in self.records:
            raise KeyError(f"site {site!r} was not captured; captured: {list(self.records)}")
        rec = self.records[site]
        if not rec.chunks:
            raise RuntimeError(f"nothing captured at {site!r}: run the U-Net inside `with`")
        return rec

    def tokens(self, site: str) -> Tensor:
        return torch.cat(self._record(site).chunks)

    def timesteps(self, site: str) -> Tensor:
        return torch.cat(self._record(site).timesteps)

    def rows(self, site: str) -> Tensor:
        return torch.cat(self._record(site).rows)

    def captions(self, site: str) -> Tensor:
        rec = self._record(site)
        if any(c is None for c in rec.captions):
            raise RuntimeError(f"{site}: some U-Net calls were not made by `sample`")
        return torch.cat(rec.captions)  # type: ignore[arg-type]

    def calls(self, site: str) -> Tensor:
        rec = self._record(site)
        return torch.cat([torch.full((len(x),), c) for x, c in zip(rec.chunks, rec.calls)])


def capture_sites(
    unet: nn.Module,
    sites: Sequence[str],
    keep: Callable[[str, Tensor], bool] | None = None,
    value: str = "update",
) -> UNetCapture:
    """``with capture_sites(unet, [site]) as cap: sample(...)``, then ``cap.tokens(site)``."""
    return UNetCapture(unet, sites, keep, value)


@contextmanager
def replace_site(
    unet: nn.Module,
    site: str,
    fn: Callable[[Tensor, Tensor], Tensor],
    value: str = "update",
    fn_device: str | torch.device | None = "cpu",
    per_caption: bool = False,
) -> Iterator[None]:
    """Inside ``with``, the block at ``site`` outputs h + fn(delta, t) instead of h + delta.

    ``fn`` gets the residual update as tokens (B*H*W, C) and each token's timestep (B*H*W,) and
    returns new tokens of the same shape (an SAE reconstruction, an edited code decoded). The
    output is written as y + (fn(delta) - delta), so the identity leaves it bit-for-bit unchanged.
    With ``value="output"`` fn gets and replaces the block output y itself: y -> fn(y, t).
    ``fn`` runs on ``fn_device`` in float32 (the CPU by default, where SAEs trained on captured
    tokens live; None: the U-Net's device and dtype), its result goes back to the U-Net's.
    ``per_caption``: fn(delta, t, captions) also gets the caption index (into ``sample``'s
    captions) of each token, -1 on the unconditional rows of guidance, to edit per caption.
    """
    _check_value(value)
    module = resolve_unet_site(unet, site)
    tracker = _TimestepTracker(unet)

    def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        h, y = _block_io(args, kwargs, output)
        b, c, hh, ww = y.shape
        delta = tokens_from(y - h if value == "update" else y, "spatial").reshape(-1, c)
        t = tracker.per_token(b, hh * ww)
        extra = (_token_captions(site, b, hh * ww),) if per_caption else ()
        if fn_device is None:
            new = fn(delta, t.to(delta.device), *(e.to(delta.device) for e in extra))
        else:
            x = delta.to(fn_device, torch.float32)
            new = fn(x, t.to(fn_device), *(e.to(fn_device) for e in extra))
        if not isinstance(new, Tensor) or new.shape != delta.shape:
            raise ValueError(
                f"replacement at {site} must return a tensor of shape {tuple(delta.shape)} "
                f"(tokens x channels), got {getattr(new, 'shape', type(new))}"
            )
        new = new.to(delta.device, delta.dtype)
        change = (new - delta).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        return _with_output(output, y + change)

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        tracker.handle.remove()


# --- command line ---------------------------------------------------------------------------------
def _fashion_mnist(split: str, size: int, n: int | None, seed: int) -> tuple[Tensor, Tensor, tuple]:
    from common.data.images import load_fashion_mnist, resize

    data = load_fashion_mnist(split)
    if n is not None:
        data = data.subset(n, seed=seed)
    return resize(data.images, size), data.labels, data.class_names


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


def _cmd_train(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    unet_cfg = UNetConfig(channels=tuple(args.channels), layers_per_block=args.layers_per_block)
    cfg = DiffusionTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        p_uncond=args.p_uncond,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    images, labels, names = _fashion_mnist("train", unet_cfg.image_size, args.n_train, args.seed)
    _, metrics = train_diffusion(
        images,
        labels,
        names,
        args.out,
        unet_cfg=unet_cfg,
        cfg=cfg,
        resume=not args.no_resume,
        device=args.device,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "loss_curve"}, indent=1))
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(metrics, indent=1) + "\n")


def _cmd_sample(args: argparse.Namespace) -> None:
    from common.models.classifier import score
    from common.models.scorers import load_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_diffusion(args.model, class_names=args.class_names)
    model.unet.to(args.device)
    classifier = load_scorer(args.classifier, model.class_names) if args.classifier else None
    captions = class_captions(model, args.per_class, args.template)
    labels = torch.arange(len(model.class_names)).repeat_interleave(args.per_class)
    out = Path(args.out)
    runs = []
    for steps in [int(v) for part in args.steps for v in str(part).split(",") if v.strip()]:
        t0 = time.perf_counter()
        images = sample(
            model,
            captions,
            num_steps=steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            seed=args.seed,
        )
        run: dict[str, Any] = {
            "num_steps": steps,
            "guidance_scale": args.guidance,
            "eta": args.eta,
            "seed": args.seed,
            "per_class": args.per_class,
            "sample_wall_s": round(time.perf_counter() - t0, 1),
        }
        if classifier is not None:
            run |= score(classifier, images, labels)
        runs.append(run)
        save_grid(
            images, len(model.class_names), out / f"samples_{steps}steps.png", model.class_names
        )
        print(json.dumps({k: v for k, v in run.items() if k != "per_class_accuracy"}))
    metrics = {"caption_template": model.templates[args.template], "runs": runs}
    path = Path(args.metrics) if args.metrics else out / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m common.models.diffusion",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    d_cfg, d_unet = DiffusionTrainConfig(), UNetConfig()

    t = sub.add_parser("train", help="train the U-Net on 16x16 Fashion-MNIST")
    t.add_argument("--out", required=True, help="model folder (unet/, scheduler/, checkpoint)")
    t.add_argument("--steps", type=int, default=d_cfg.steps)
    t.add_argument("--batch-size", type=int, default=d_cfg.batch_size)
    t.add_argument("--lr", type=float, default=d_cfg.lr)
    t.add_argument("--ema-decay", type=float, default=d_cfg.ema_decay)
    t.add_argument("--p-uncond", type=float, default=d_cfg.p_uncond)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=d_cfg.checkpoint_every)
    t.add_argument("--channels", type=int, nargs="+", default=list(d_unet.channels))
    t.add_argument("--layers-per-block", type=int, default=d_unet.layers_per_block)
    t.add_argument("--n-train", type=int, default=None, help="train on a seeded subset")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--metrics", default=None, help="write training metrics JSON here")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="draw a class grid and score it with the classifier")
    s.add_argument("--model", required=True)
    s.add_argument(
        "--classifier",
        default=None,
        help="scorer: a folder from common.models.classifier, or a CLIP (zero-shot) for a hub "
        "pipeline's images",
    )
    s.add_argument(
        "--class-names", nargs="+", default=None, help="concepts to prompt (hub pipelines)"
    )
    s.add_argument("--per-class", type=int, default=16)
    s.add_argument(
        "--steps", nargs="+", default=["10"], help="DDIM steps, several ok: 1 4 10 or 1,4,10"
    )
    s.add_argument("--guidance", type=float, default=3.0)
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0: deterministic ODE)")
    s.add_argument("--template", type=int, default=0, help="index into the caption templates")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    s.add_argument("--out", required=True, help="folder for samples_<k>steps.png")
    s.add_argument("--metrics", default=None, help="metrics JSON (default OUT/metrics.json)")
    s.set_defaults(func=_cmd_sample)

    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
