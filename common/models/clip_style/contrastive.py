"""Contrastive training of the heads on precomputed tower features (CLIP's symmetric InfoNCE).

loss         L = (CE(S, Y) + CE(S^T, Y^T)) / 2  (``info_nce``); the towers stay frozen, only
             W_I, W_T and t are trained (``fit_heads``, AdamW with cosine decay).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from common.models.clip_style.model import CLIPStyleModel


def info_nce(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, groups: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE of CLIP: L = (CE(S, Y) + CE(S^T, Y^T)) / 2, S_ij = exp(t) <e_I_i, e_T_j>.

    Without ``groups`` Y = I (pair i is the only positive of row i), CLIP's loss. With ``groups``
    (the caption's class) every pair of the same group is a positive:
    Y_ij = 1[g_i = g_j] / sum_k 1[g_i = g_k]; captions built from class names repeat within a
    batch, and calling identical captions negatives would ask for the impossible. Y is symmetric,
    so both directions use the same target; with all groups distinct it reduces to Y = I.
    """
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    logits = scale * image_emb @ text_emb.T
    if groups is None:
        targets = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    y = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


# --- captioned features ---------------------------------------------------------------------------
@dataclass
class CaptionedFeatures:
    """Pooled image features with their caption group and every caption's text features.

    ``groups[i]`` indexes ``group_names``; image i is paired, each epoch, with one of its group's
    captions drawn uniformly: ``caption_features[groups[i], k]`` for a random template k.
    """

    image_features: Tensor  # (N, 1280)
    groups: Tensor  # (N,) int64
    caption_features: Tensor  # (G, n_templates, 384)
    group_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.image_features) != len(self.groups):
            raise ValueError(
                f"{len(self.image_features)} image features but {len(self.groups)} groups"
            )
        if len(self.groups) and int(self.groups.max()) >= len(self.caption_features):
            raise ValueError("a group index exceeds the number of caption groups")


def fit_heads(
    model: CLIPStyleModel,
    data: CaptionedFeatures,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    num_threads: int | None = 1,
    progress: bool = False,
) -> list[float]:
    """Train W_I, W_T and t with ``info_nce`` (AdamW, cosine decay); return the loss per epoch.

    Sets the feature statistics mu, sigma from ``data`` first. Deterministic given ``seed``.
    ``num_threads``: torch threads during training (restored after; ``None`` leaves them). The
    heads are small matrices; on a shared 2-core CPU one thread ran 6x faster than two.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _fit_heads(model, data, epochs, batch_size, lr, weight_decay, seed, progress)
    finally:
        torch.set_num_threads(previous)


def _fit_heads(
    model: CLIPStyleModel,
    data: CaptionedFeatures,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool,
) -> list[float]:
    if epochs <= 0 or batch_size <= 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    n = len(data.groups)
    if n < 2:
        raise ValueError(f"need at least 2 training images, got {n}")
    g = torch.Generator().manual_seed(seed)
    device = model.image_proj.weight.device
    all_captions = data.caption_features.flatten(0, 1)
    model.set_feature_stats(data.image_features.to(device), all_captions.to(device))
    x_all, groups = data.image_features.to(device), data.groups.to(device)
    captions = data.caption_features.to(device)
    n_templates = captions.shape[1]
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(
        [
            {
                "params": [model.image_proj.weight, model.text_proj.weight],
                "weight_decay": weight_decay,
            },
            {"params": [model.logit_scale], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history = []
    model.train()
    for _ in tqdm(range(epochs), desc="clip-style heads", disable=not progress):
        perm = torch.randperm(n, generator=g).to(device)
        template = torch.randint(n_templates, (n,), generator=g).to(device)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:
                continue
            text_x = captions[groups[idx], template[idx]]
            e_i = model.project_image_features(x_all[idx])
            e_t = model.project_text_features(text_x)
            scale = model.logit_scale.clamp(max=model.cfg.logit_scale_max)
            loss = info_nce(e_i, e_t, scale, groups[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        history.append(total / seen)
    model.eval()
    return history
