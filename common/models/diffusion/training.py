"""Training the U-Net (``train_diffusion``) and its resumable checkpoints.

The DDPM loss (Ho et al., 2020), with the caption dropped for a fraction ``p_uncond`` of images
(Ho & Salimans, 2022)::

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   L = E ||eps - eps_theta(x_t, t, c)||^2

AdamW with warm-up then cosine decay, gradient clipping and an EMA of the weights (the saved
model). Everything random in step t comes from (seed, t), so a resumed run ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.models.diffusion.conditioning import CAPTION_TEMPLATES, CaptionEncoder
from common.models.diffusion.unet import (
    CHECKPOINT_FILE,
    DiffusionModel,
    UNetConfig,
    build_unet,
    noise_scheduler,
)

MACHINE_DEPENDENT = ("loss_curve", "wall_s", "cpu_s", "torch_threads", "steps_this_run")


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
