"""Patch-level SAE statistics (paper 14: Lim et al., ICLR 2025, "Patch-SAE").

An SAE is trained on every token of a vision encoder's last layer, the patch tokens and the
CLS-like pooled token. For latent s and patch token j of image i, h_ij[s] is its activation.

Activation counts (Sec. 3 of the paper), binarised with a small threshold tau:

    a_ij[s] = 1(h_ij[s] > tau)                      patch
    a_i[s]  = sum_j a_ij[s]                          image
    a_c[s]  = sum_{i in class c} a_i[s]              class
    a_D[s]  = sum_{i in D} a_i[s]                    dataset (each of the image sets)

Per-latent statistics from its reference images R_s, the ``top_k`` images of largest image-level
activation m_i[s] = mean_j h_ij[s] (only images with m_i[s] > 0):

    firing frequency  f_s = #{(i, j) : h_ij[s] > 0} / #tokens
    mean activation   mean of h_ij[s] over the tokens where it fires
    label entropy     H_s = - sum_c p_c log p_c,  p_c = |{i in R_s : y_i = c}| / |R_s|
    label std         std of the label indices y_i over R_s

Localisation (our quantitative stand-in for the paper's heat-maps): with g_ij the share of
foreground pixels under patch j of image i, a latent's on-object share over its reference images
is sum_ij h_ij g_ij / sum_ij h_ij, against the area share mean_ij g_ij of the object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.sae import SAE


@dataclass
class TokenStats:
    """Accumulated per-image / per-latent activation statistics of an SAE over image tokens."""

    image_mean: Tensor  # (N, S) m_i[s] = mean over patches of h_ij[s]
    image_count: Tensor  # (N, S) a_i[s] = #{j : h_ij[s] > tau}
    patch_fires: Tensor  # (S,) #{(i, j) : h_ij[s] > 0} over patch tokens
    patch_sum: Tensor  # (S,) sum of h_ij[s] over patch tokens
    pooled_fires: Tensor  # (S,) #{i : h_i,pooled[s] > 0}
    n_patches: int  # patch tokens per image
    l0_patch: float  # mean #{s : h_ij[s] > 0} per patch token
    l0_pooled: float  # the same for the pooled token


@torch.no_grad()
def sae_codes(sae: SAE, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(z, x_hat)`` of tokens ``x`` (..., d) in raw units, the leading shape kept."""
    sae.eval()
    flat = x.reshape(-1, x.shape[-1])
    z = sae.encode(sae.scale_in(flat))
    x_hat = sae.scale_out(sae.decode(z))
    return z.reshape(*x.shape[:-1], -1), x_hat.reshape(x.shape)


@torch.no_grad()
def reconstruct(sae: SAE, x: Tensor, batch_size: int = 4096) -> tuple[Tensor, float]:
    """``(x_hat, L0)`` of tokens ``x`` (..., d), in chunks so that the code is never held whole."""
    flat = x.reshape(-1, x.shape[-1])
    parts, active = [], 0.0
    for chunk in flat.split(batch_size):
        z, x_hat = sae_codes(sae, chunk)
        parts.append(x_hat)
        active += float((z > 0).sum())
    return torch.cat(parts).reshape(x.shape), active / max(1, len(flat))


@torch.no_grad()
def token_statistics(
    sae: SAE, patches: Tensor, pooled: Tensor, tau: float, batch_size: int = 64
) -> TokenStats:
    """Accumulate ``TokenStats`` over images in chunks (the full (N, P, S) code is not kept)."""
    n, p, _ = patches.shape
    means, counts = [], []
    s = sae.cfg.d_sae
    fires, sums, pooled_fires = torch.zeros(s), torch.zeros(s), torch.zeros(s)
    l0_patch = l0_pooled = 0.0
    for start in range(0, n, batch_size):
        h, _ = sae_codes(sae, patches[start : start + batch_size])  # (B, P, S)
        hp, _ = sae_codes(sae, pooled[start : start + batch_size])  # (B, S)
        means.append(h.mean(1))
        counts.append((h > tau).sum(1).to(torch.int32))
        active = h > 0
        fires += active.sum((0, 1)).float()
        sums += h.sum((0, 1))
        pooled_fires += (hp > 0).sum(0).float()
        l0_patch += float(active.sum())
        l0_pooled += float((hp > 0).sum())
    return TokenStats(
        image_mean=torch.cat(means),
        image_count=torch.cat(counts),
        patch_fires=fires,
        patch_sum=sums,
        pooled_fires=pooled_fires,
        n_patches=p,
        l0_patch=l0_patch / (n * p),
        l0_pooled=l0_pooled / n,
    )


def activation_funnel(
    image_count: Tensor, labels: Tensor, n_labels: int, dataset_ids: Tensor
) -> dict[str, Tensor]:
    """Patch -> image -> class -> dataset counts per latent, from a_i[s] (N, S).

    Returns ``image`` (N, S) = a_i, ``class`` (C, S) = a_c, ``dataset`` (n_datasets, S) = a_D per
    dataset, and the numbers of images / classes / datasets that the latent reaches at all.
    """
    a_i = image_count.float()
    a_c = torch.zeros(n_labels, a_i.shape[1]).index_add_(0, labels, a_i)
    n_sets = int(dataset_ids.max()) + 1
    a_d = torch.zeros(n_sets, a_i.shape[1]).index_add_(0, dataset_ids, a_i)
    return {
        "image": a_i,
        "class": a_c,
        "dataset": a_d,
        "n_images": (a_i > 0).sum(0),
        "n_classes": (a_c > 0).sum(0),
        "n_datasets": (a_d > 0).sum(0),
    }


def reference_images(image_mean: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Indices (S, k) of each latent's top-k images by m_i[s] and a mask of those with m > 0."""
    k = min(top_k, image_mean.shape[0])
    values, idx = image_mean.topk(k, dim=0)  # (k, S)
    return idx.T, (values > 0).T


def label_entropy(labels: Tensor, mask: Tensor, n_labels: int) -> Tensor:
    """H_s = -sum_c p_c log p_c (nats) of the masked labels (S, k); NaN where nothing is kept."""
    onehot = F.one_hot(labels, n_labels).float() * mask[..., None]
    counts = onehot.sum(1)  # (S, C)
    total = counts.sum(1, keepdim=True)
    p = counts / total.clamp_min(1)
    h = -(p * p.clamp_min(1e-12).log()).sum(1)
    return torch.where(total[:, 0] > 0, h, torch.full_like(h, math.nan))


def latent_statistics(
    stats: TokenStats, labels: Tensor, n_labels: int, top_k: int, n_images: int
) -> dict[str, np.ndarray]:
    """Per-latent firing frequency, mean activation, label entropy and std of reference images."""
    idx, mask = reference_images(stats.image_mean, top_k)
    ref_labels = labels[idx]  # (S, k)
    n_ref = mask.sum(1)
    ref_float = ref_labels.float()
    mean = (ref_float * mask).sum(1) / n_ref.clamp_min(1)
    var = (((ref_float - mean[:, None]) ** 2) * mask).sum(1) / n_ref.clamp_min(1)
    n_tokens = n_images * stats.n_patches
    return {
        "firing_frequency": (stats.patch_fires / n_tokens).numpy(),
        "mean_activation": (stats.patch_sum / stats.patch_fires.clamp_min(1)).numpy(),
        "label_entropy": label_entropy(ref_labels, mask, n_labels).numpy(),
        "label_std": torch.where(n_ref > 0, var.sqrt(), torch.nan).numpy(),
        "n_reference": n_ref.numpy(),
    }


def random_entropy(labels: Tensor, n_labels: int, k: int, draws: int, seed: int) -> float:
    """Null: mean label entropy of ``draws`` random k-image sets from the same image pool."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(len(labels), generator=g)[:k] for _ in range(draws)])
    mask = torch.ones_like(idx, dtype=torch.bool)
    return float(label_entropy(labels[idx], mask, n_labels).mean())


def foreground_share(images: Tensor, side: int, threshold: float = 0.2) -> Tensor:
    """g_ij: share of pixels brighter than ``threshold`` (of 255) under each of side x side cells.

    Grey uint8 images (N, H, W); the cells tile the image as the feature map tiles the resized
    input (EfficientNet's last map is a 32x downsampling, aligned with the image).
    """
    fg = (images.float() / 255.0 > threshold).float()[:, None]
    big = F.interpolate(fg, size=(side * 8, side * 8), mode="nearest")
    return F.adaptive_avg_pool2d(big, side).flatten(1)  # (N, side*side)


@torch.no_grad()
def latent_activation(sae: SAE, x: Tensor, s: int) -> Tensor:
    """h[s] = ReLU(w_s . (x - b_D) + b_E[s]) for one latent of a ReLU SAE (no full code)."""
    pre = (sae.scale_in(x) - sae.b_dec) @ sae.W_enc[:, s] + sae.b_enc[s]
    return torch.relu(pre)


@torch.no_grad()
def on_object_share(
    sae: SAE,
    patches: Tensor,
    fg: Tensor,
    ref_idx: Tensor,
    ref_mask: Tensor,
    latents: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """Per latent: on-object activation share and object area share over its reference images."""
    on, area = [], []
    for s in latents:
        rows = ref_idx[s][ref_mask[s]]
        if len(rows) == 0:
            on.append(math.nan)
            area.append(math.nan)
            continue
        h = latent_activation(sae, patches[rows], s)  # (k, P)
        g = fg[rows]
        on.append(float((h * g).sum() / h.sum().clamp_min(1e-12)))
        area.append(float(g.mean()))
    return np.array(on), np.array(area)


@torch.no_grad()
def zero_shot_predictions(model: torch.nn.Module, pooled: Tensor, weights: Tensor) -> Tensor:
    """CLIP zero-shot: argmax_c <e_I, w_c> for pooled tower features (B, d) and class weights."""
    emb = model.project_image_features(pooled)
    return (emb @ weights.T).argmax(1)


def heatmap(h: Tensor, size: int) -> Tensor:
    """A latent's (P,) patch activations as a (size, size) map, bilinearly upsampled."""
    side = math.isqrt(h.shape[-1])
    grid = h.reshape(1, 1, side, side).float()
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)[0, 0]


# --- the notebook's steps ------------------------------------------------------------------------
@torch.no_grad()
def image_tokens(clip: torch.nn.Module, images: Tensor, batch_size: int) -> tuple[Tensor, Tensor]:
    """The image tower's patch tokens (N, P, d) and pooled tokens (N, d), in batches."""
    from tqdm.auto import tqdm

    patches, pooled = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="image tokens", leave=False):
        t = clip.image_tokens(images[i : i + batch_size], batch_size=batch_size)
        patches.append(t.patches)
        pooled.append(t.pooled)
    return torch.cat(patches), torch.cat(pooled)


def latent_table(
    stats: TokenStats,
    labels: Tensor,
    dataset_ids: Tensor,
    n_labels: int,
    top_k: int,
    selective_threshold: float,
) -> tuple[object, dict[str, Tensor]]:
    """Per latent: the statistics, the funnel's reach (images, classes, datasets), its top class,
    and the flags alive, enough_references (>= top_k / 2 reference images) and class_selective
    (label entropy below ``selective_threshold``); and the funnel itself."""
    import pandas as pd

    table = pd.DataFrame(latent_statistics(stats, labels, n_labels, top_k, len(labels)))
    funnel = activation_funnel(stats.image_count, labels, n_labels, dataset_ids)
    table["n_images_reached"] = funnel["n_images"].numpy()
    table["n_classes_reached"] = funnel["n_classes"].numpy()
    table["n_datasets_reached"] = funnel["n_datasets"].numpy()
    table["top_class"] = funnel["class"].argmax(0).numpy()
    table["alive"] = table["firing_frequency"] > 0
    table["enough_references"] = table["n_reference"] >= top_k // 2
    table["class_selective"] = table["enough_references"] & (
        table["label_entropy"] < selective_threshold
    )
    return table, funnel


def seed_metrics(
    table,
    recon,
    zero_shot,
    localisation: dict,
    *,
    d_sae: int,
    n_images: int,
    null_entropy: float,
    max_entropy: float,
) -> dict:
    """One seed's metrics: the SAE's reconstruction, the latent statistics, zero-shot accuracy per
    dataset, and under ``derived`` the numbers the claims compare. ``recon`` and ``zero_shot`` are
    this seed's rows; ``n_images`` the number of training images."""
    t, rec = table, recon.set_index("token")
    ref = t[t.enough_references]
    out = {
        "sae": {
            "d_sae": float(d_sae),
            "fvu_patch": float(rec.loc["patch", "fvu"]),
            "fvu_pooled": float(rec.loc["pooled", "fvu"]),
            "l0_patch": float(rec.loc["patch", "l0"]),
            "l0_pooled": float(rec.loc["pooled", "l0"]),
            "alive_fraction": float(t.alive.mean()),
            "train_seconds": float(rec.loc["patch", "train_seconds"]),
        },
        "latents": {
            "referenced_fraction": float(t.enough_references.mean()),
            "median_label_entropy": float(ref.label_entropy.median()),
            "median_label_std": float(ref.label_std.median()),
            "mean_classes_reached": float(t.n_classes_reached[t.alive].mean()),
            "both_datasets_fraction": float((t.n_datasets_reached[t.alive] > 1).mean()),
            "mean_image_share_reached": float((t.n_images_reached[t.alive] / n_images).mean()),
        },
    }
    for name, g in zero_shot.groupby("dataset"):
        out["zero_shot_" + name.replace("-", "_")] = {
            r.variant: float(r.accuracy) for r in g.itertuples()
        }
    mean_acc = zero_shot.groupby("variant")["accuracy"].mean()
    n_ref = max(1, int(t.enough_references.sum()))
    out["derived"] = {
        **{f"zero_shot_{v}": float(mean_acc[v]) for v in ZERO_SHOT_VARIANTS},
        "class_selective_share": float(t.class_selective.sum() / n_ref),
        "median_label_entropy": float(ref.label_entropy.median()),
        "random_label_entropy": null_entropy,
        "max_label_entropy": max_entropy,
        "l0_over_width": float(rec.loc["patch", "l0"]) / d_sae,
        "on_object_share": localisation["on_object_share"],
        "object_area_share": localisation["object_area_share"],
    }
    return out


ZERO_SHOT_VARIANTS = ("original", "sae_patches", "sae_pooled", "mean_ablation")
