"""SAEs on the residual updates of a few-step text-to-image U-Net (paper 37: Surkov et al.,
NeurIPS 2025, "One step is enough: sparse autoencoders for text-to-image diffusion models").

The activation of a cross-attention transformer block ``l`` of the U-Net is its residual update

    delta_l = B_l(h) - h   in R^C, one token per spatial position (and denoising step),

and one TopK SAE per block reconstructs it (Gao et al. 2024):

    z = TopK_k(ReLU(W_enc^T (delta - b_dec) + b_enc)),      delta_hat = W_dec^T z + b_dec.

Interventions edit the update while the image is generated, keeping the SAE's error term
e = delta - delta_hat untouched (so an empty edit is the identity):

    feature ablation   delta' = delta - sum_{s in S} z_s d_s              (turn features off)
    feature steering   delta' = delta + alpha * a_s * d_s   at every position (turn a feature on)

with d_s the unit decoder row of latent s (in raw units d_s / input_scale) and a_s its typical
activation. Controls replace the feature directions by random unit directions of the same norm.

The effect of an edit on an image x (16x16, in [0, 1]) is measured by the classifier's prediction
(class flip rate, the rate it reads a steering target) and by the pixel change Delta = x' - x
split by spatial frequency with the orthonormal 2-D DFT (Parseval, so the parts add up):

    ||Delta||^2 = sum_{|f| <= f_c} |F Delta (f)|^2  +  sum_{|f| > f_c} |F Delta (f)|^2
                = E_low (composition, shape)        +  E_high (detail, edges, texture)

with |f| the radial frequency in cycles per image and f_c the cut-off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.evals.evaluate import encode_decode
from common.evals.reconstruction import reconstruction_metrics
from common.models.diffusion import (
    UNetCapture,
    capture_sites,
    class_captions,
    load_tokens,
    replace_site,
    sample,
    save_tokens,
)
from common.sae import SAE


# --- SAE codes in raw units ---------------------------------------------------------------------
def sae_codes(sae: SAE, x: Tensor, batch_size: int = 8192) -> tuple[Tensor, Tensor]:
    """``(z, x_hat)`` for tokens ``x`` (N, d) in raw units: z = encode(c x), x_hat = decode(z)/c."""
    return encode_decode(sae, x, batch_size)


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """FVU = sum_n ||x_n - x_hat_n||^2 / sum_n ||x_n - mean(x)||^2 (variance about x's own mean)."""
    if x.shape != x_hat.shape or x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need two (N >= 2, d) tensors of one shape, got {x.shape}, {x_hat.shape}")
    return reconstruction_metrics(x, x_hat)["fvu"]


def fvu_by_group(x: Tensor, x_hat: Tensor, groups: Tensor) -> dict[int, float]:
    """FVU within each group (e.g. each timestep t): {t: FVU(x[g == t], x_hat[g == t])}."""
    return {int(g): fvu(x[groups == g], x_hat[groups == g]) for g in groups.unique().tolist()}


# --- class-specific features --------------------------------------------------------------------
def class_mean_codes(z: Tensor, classes: Tensor, n_classes: int) -> Tensor:
    """mu[c, s] = mean of z_s over the tokens of images prompted with class c, (C, S)."""
    if len(z) != len(classes):
        raise ValueError(f"{len(z)} codes but {len(classes)} class labels")
    sums = torch.zeros(n_classes, z.shape[1]).index_add_(0, classes, z.float())
    counts = torch.bincount(classes, minlength=n_classes).clamp_min(1).float()
    return sums / counts[:, None]


def class_specificity(mu: Tensor) -> Tensor:
    """spec[c, s] = mu[c, s] - mean_{c' != c} mu[c', s]: how much more s fires for class c."""
    n = mu.shape[0]
    if n < 2:
        raise ValueError("need at least two classes")
    others = (mu.sum(0, keepdim=True) - mu) / (n - 1)
    return mu - others


def top_class_features(spec: Tensor, m: int) -> Tensor:
    """(C, m) latent indices of each class's m most class-specific latents (largest spec)."""
    if not 0 < m <= spec.shape[1]:
        raise ValueError(f"m must be in [1, {spec.shape[1]}], got {m}")
    return spec.topk(m, dim=1).indices


def class_position_codes(
    z: Tensor, classes: Tensor, positions: Tensor, n_classes: int, n_positions: int
) -> Tensor:
    """mu[c, p, s] = mean of z_s at spatial position p over images prompted with class c."""
    key = classes * n_positions + positions
    sums = torch.zeros(n_classes * n_positions, z.shape[1]).index_add_(0, key, z.float())
    counts = torch.bincount(key, minlength=n_classes * n_positions).clamp_min(1).float()
    return (sums / counts[:, None]).view(n_classes, n_positions, -1)


def typical_activation(z: Tensor) -> Tensor:
    """a_s = mean of z_s over the tokens where it fires (0 for a latent that never fires), (S,)."""
    fires = (z > 0).sum(0)
    return z.sum(0) / fires.clamp_min(1)


# --- edits of the residual update ---------------------------------------------------------------
def unit_directions(sae: SAE) -> Tensor:
    """Decoder rows d_s in raw activation units, (S, d): W_dec / input_scale (unit W_dec rows)."""
    return sae.W_dec.detach() / sae.cfg.input_scale


def random_unit(n: int, d: int, seed: int) -> Tensor:
    """n random unit vectors in R^d (Gaussian, normalised), from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g)
    return r / r.norm(dim=1, keepdim=True)


def make_edit(
    sae: SAE,
    positions: int,
    ablate: Tensor | None = None,
    add: Tensor | None = None,
    random_ablate: Tensor | None = None,
    cond_only: bool = True,
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """A ``replace_site(..., per_caption=True)`` function that edits each caption's tokens (SAE
    error term kept); it gets the caption index of every token (-1 on unconditional rows).

    ``ablate`` (n_captions, S) bool: latents to turn off for that caption's tokens,
    delta' = delta - sum_{s in S_i} z_s d_s. ``random_ablate`` (n_captions, d) unit vectors: the
    control, delta' = delta - ||sum_{s in S_i} z_s d_s|| r_i (the same norm removed along a random
    direction). ``add`` (n_captions, d): a vector added at every position of caption i's tokens
    (steering, alpha a_s d_s, or its random control); (n_captions, H*W, d): one per position
    (tokens come row-major, ``positions`` = H*W per row).
    ``cond_only``: edit only the conditional rows of a guided call (the pass that reads the
    prompt; SDXL Turbo runs without guidance, so all its passes are conditional); the
    unconditional rows are left as they are.
    """
    dirs = unit_directions(sae)

    def fn(delta: Tensor, _t: Tensor, captions: Tensor) -> Tensor:
        idx, cond = captions.clamp_min(0), captions >= 0
        change = torch.zeros_like(delta)
        if ablate is not None:
            z, _ = sae_codes(sae, delta)
            removed = (z * ablate[idx].to(z.dtype)) @ dirs
            if random_ablate is None:
                change -= removed
            else:
                change -= removed.norm(dim=1, keepdim=True) * random_ablate[idx]
        if add is not None:
            if add.ndim == 3:
                change += add[idx, torch.arange(len(delta)) % positions]
            else:
                change += add[idx]
        if cond_only:
            change[~cond] = 0
        return delta + change

    return fn


def reconstruction_edit(sae: SAE | None, mean: Tensor | None = None) -> Callable:
    """``replace_site`` function: delta -> SAE reconstruction (or -> ``mean`` when sae is None),
    the same for every caption (it accepts and ignores ``per_caption``'s caption indices)."""
    if sae is None and mean is None:
        raise ValueError("give an SAE (reconstruction) or a mean vector (mean ablation)")

    def fn(delta: Tensor, _t: Tensor, _captions: Tensor | None = None) -> Tensor:
        if sae is None:
            return mean.expand_as(delta).clone()
        return sae_codes(sae, delta)[1]

    return fn


# --- effects on the images ----------------------------------------------------------------------
def radial_frequency(size: int) -> Tensor:
    """|f| in cycles per image of each 2-D DFT coefficient of a size x size image, (size, size)."""
    f = torch.fft.fftfreq(size) * size
    return torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)


def frequency_energy(diff: Tensor, cutoff: float) -> tuple[Tensor, Tensor]:
    """(E_low, E_high) per image of a pixel change (N, 1, S, S): orthonormal DFT energy with
    |f| <= cutoff and |f| > cutoff; E_low + E_high = ||diff||^2 (Parseval)."""
    if diff.ndim != 4:
        raise ValueError(f"expected (N, 1, S, S) images, got {tuple(diff.shape)}")
    spec = torch.fft.fft2(diff.double(), norm="ortho").abs().pow(2).sum(1)  # (N, S, S)
    low = radial_frequency(diff.shape[-1]) <= cutoff
    return spec[:, low].sum(1).float(), spec[:, ~low].sum(1).float()


def edit_effects(
    before: Tensor,
    after: Tensor,
    pred_before: Tensor,
    pred_after: Tensor,
    cutoff: float,
    target: Tensor | None = None,
) -> dict[str, float]:
    """Per-edit effect measures, averaged over images.

    flip_rate: P(pred_after != pred_before); target_rate: P(pred_after == target) (steering);
    rms_low / rms_high: sqrt(mean E_low / pixels), sqrt(mean E_high / pixels);
    low_share: sum E_low / sum (E_low + E_high); n_images: the images the rates are over;
    rms_high_kept: rms_high over images whose class
    was kept (the detail change that leaves the class alone; null if none kept).
    """
    if before.shape != after.shape:
        raise ValueError(f"image shapes differ: {tuple(before.shape)} vs {tuple(after.shape)}")
    e_low, e_high = frequency_energy(after - before, cutoff)
    pixels = before[0].numel()
    flipped = pred_after != pred_before
    kept = ~flipped
    total = float((e_low + e_high).sum())
    out = {
        "n_images": len(before),
        "flip_rate": float(flipped.float().mean()),
        "rms_low": float((e_low.mean() / pixels).sqrt()),
        "rms_high": float((e_high.mean() / pixels).sqrt()),
        "low_share": float(e_low.sum()) / total if total > 0 else None,
        "rms_high_kept": float((e_high[kept].mean() / pixels).sqrt()) if kept.any() else None,
    }
    if target is not None:
        out["target_rate"] = float((pred_after == target).float().mean())
    return out


def steering_pairs(n_classes: int, sources_per_target: int, seed: int) -> list[tuple[int, int]]:
    """(prompted class A, steered-to class B) pairs, A != B: for every B, ``sources_per_target``
    distinct A drawn at random (all n-1 when it is larger)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for b in range(n_classes):
        others = [a for a in range(n_classes) if a != b]
        take = min(sources_per_target, len(others))
        perm = torch.randperm(len(others), generator=g)[:take].tolist()
        pairs += [(others[i], b) for i in sorted(perm)]
    return pairs


def argmax_index(values: Sequence[float | None]) -> int | None:
    """Index of the largest non-null value (None when all are null)."""
    valid = [(v, i) for i, v in enumerate(values) if v is not None]
    return max(valid)[1] if valid else None


# --- blocks -------------------------------------------------------------------------------------
def short_name(site: str) -> str:
    """``unet.down_blocks.2.attentions.1`` -> ``down.2.1`` (the paper's names); mid -> ``mid.0``."""
    parts = site.removeprefix("unet.").split(".")
    if parts[0] == "mid_block":
        return f"mid.{parts[-1]}"
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) == 4:
        return f"{parts[0].split('_')[0]}.{parts[1]}.{parts[3]}"
    return ".".join(parts)


def pick_sites(
    valid: Sequence[str], requested: str | Sequence[str], max_auto: int = 5
) -> list[str]:
    """The blocks to study. ``"auto"``: all when there are <= ``max_auto``, else the analogues of
    the paper's four SDXL blocks (the deepest down block's last attention, the mid block, the first
    two of the first up block) plus the last (highest-resolution) block, in forward order.
    A list is checked against ``valid``."""
    valid = list(valid)
    if isinstance(requested, str) and requested != "auto":
        requested = [requested]
    if not isinstance(requested, str):
        bad = [s for s in requested if s not in valid]
        if bad or not requested:
            raise ValueError(f"unknown or no U-Net sites {bad or requested}; valid: {valid}")
        return list(dict.fromkeys(requested))
    if len(valid) <= max_auto:
        return valid
    down = [s for s in valid if "down_blocks" in s]
    deepest = max(int(s.split(".")[2]) for s in down) if down else None
    chosen = [s for s in down if int(s.split(".")[2]) == deepest][-1:]
    chosen += [s for s in valid if "mid_block" in s][:1]
    up = [s for s in valid if "up_blocks" in s]
    first_up = min(int(s.split(".")[2]) for s in up) if up else None
    chosen += [s for s in up if int(s.split(".")[2]) == first_up][:2]
    chosen += [valid[-1]]
    chosen = list(dict.fromkeys(chosen))
    return [s for s in valid if s in chosen]


# --- sampling with captures and edits -----------------------------------------------------------
def captions_for(model: Any, per_class: int, templates: Sequence[int]) -> tuple[list[str], Tensor]:
    """``per_class`` captions of every class for each template index (cycled over the model's
    templates), template-major, and the class of each."""
    caps, labels = [], []
    n_classes = len(model.class_names)
    for t in templates:
        caps += class_captions(model, per_class, t % len(model.templates))
        labels += [c for c in range(n_classes) for _ in range(per_class)]
    return caps, torch.tensor(labels)


class Generator:
    """Deterministic DDIM sampling (eta = 0) with guidance ``guidance_scale``, ``batch_size``
    captions per U-Net call (0: all at once), optionally capturing sites or editing them."""

    def __init__(self, model: Any, guidance_scale: float, batch_size: int = 0) -> None:
        self.model, self.guidance_scale, self.batch_size = model, guidance_scale, batch_size

    def __call__(
        self,
        captions: Sequence[str],
        num_steps: int,
        seed: int,
        capture: Sequence[str] | None = None,
        edit: tuple[str, Callable] | list[tuple[str, Callable]] | None = None,
    ) -> Any:
        """Images; with ``capture`` (sites) also the ``UNetCapture``; ``edit``: (site, fn) or a
        list of them, all applied together (``replace_site(..., per_caption=True)``)."""
        kwargs = {"num_steps": num_steps, "guidance_scale": self.guidance_scale, "eta": 0.0}
        kwargs |= {"seed": seed, "batch_size": self.batch_size or len(captions)}
        unet = self.model.unet
        if edit is not None:
            with ExitStack() as stack:
                for site, fn in [edit] if isinstance(edit, tuple) else edit:
                    stack.enter_context(replace_site(unet, site, fn, per_caption=True))
                return sample(self.model, captions, **kwargs)
        if capture:
            with capture_sites(unet, capture) as cap:
                images = sample(self.model, captions, **kwargs)
            return images, cap
        return sample(self.model, captions, **kwargs)


def store_sites(
    cap: UNetCapture,
    folders: dict[str, Path],
    labels: Tensor | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write each captured site to its activation store (``folders[site]``) and read it back:
    per site the tokens ``x``, timesteps ``t``, spatial position ``pos``, class ``cls`` (-1 on
    unconditional rows, or everywhere without ``labels``), positions ``P`` and channels ``C``."""
    out = {}
    for site, folder in folders.items():
        save_tokens(cap, site, folder, metadata)
        saved = load_tokens(folder)
        cls = torch.full((len(saved.tokens),), -1)
        if labels is not None:
            cond = saved.captions >= 0
            cls[cond] = labels[saved.captions[cond]]
        out[site] = {
            "x": saved.tokens,
            "t": saved.timesteps,
            "pos": torch.arange(len(saved.tokens)) % saved.positions,
            "cls": cls,
            "P": saved.positions,
            "C": saved.shape[0],
        }
    return out


# --- SAE summaries and features -----------------------------------------------------------------
def recon_summary(sae: SAE, x_eval: Tensor, x_train: Tensor) -> dict[str, float]:
    """FVU and L0 on held-out tokens, and the share of latents that fire on the training tokens."""
    z, x_hat = sae_codes(sae, x_eval)
    z_train, _ = sae_codes(sae, x_train)
    return {
        "fvu": fvu(x_eval, x_hat),
        "l0": float((z > 0).sum(1).float().mean()),
        "d_in": x_eval.shape[1],
        "alive_fraction": float(((z_train > 0).sum(0) > 0).float().mean()),
    }


def class_features(sae: SAE, d: dict[str, Any], n_classes: int, n_features: int) -> dict:
    """On the conditional tokens ``d`` of the training images: each class's ``n_features`` most
    specific latents (``top``, (C, m)), the specificity (``spec``) and the class-position mean
    codes (``map``, (C, P, S))."""
    cond = d["cls"] >= 0
    z, _ = sae_codes(sae, d["x"][cond])
    spec = class_specificity(class_mean_codes(z, d["cls"][cond], n_classes))
    return {
        "top": top_class_features(spec, min(n_features, spec.shape[1])),
        "spec": spec,
        "map": class_position_codes(z, d["cls"][cond], d["pos"][cond], n_classes, d["P"]),
    }


def ablation_mask(top: Tensor, labels: Tensor, d_sae: int) -> Tensor:
    """(n, S) bool: the latents ``top[c]`` of each caption's class c, to turn off."""
    mask = torch.zeros(len(labels), d_sae, dtype=torch.bool)
    for i, c in enumerate(labels.tolist()):
        mask[i, top[c]] = True
    return mask


def steer_vectors(
    feats: dict, dirs: Tensor, targets: Tensor, alpha: float, n_feat: int | None = None
) -> Tensor:
    """(n, P, d): alpha * sum_{s in S_B} mu_{B p s} d_s for each caption's target class B."""
    top = feats["top"][:, : n_feat or feats["top"].shape[1]]
    return torch.stack(
        [alpha * feats["map"][b][:, top[b]] @ dirs[top[b]] for b in targets.tolist()]
    )


def high_share_kept(
    before: Tensor, after: Tensor, pred_before: Tensor, pred_after: Tensor, cutoff: float
) -> float | None:
    """E_high / (E_low + E_high) of the pixel change over the images whose class was kept."""
    kept = pred_before == pred_after
    if not kept.any():
        return None
    e_low, e_high = frequency_energy(after[kept] - before[kept], cutoff)
    total = float((e_low + e_high).sum())
    return float(e_high.sum()) / total if total > 0 else None


def effect_and_flips(
    classifier: Any,
    before: Tensor,
    after: Tensor,
    pred_before: Tensor,
    cutoff: float,
    target: Tensor | None = None,
) -> tuple[dict[str, float | None], Tensor]:
    """``edit_effects`` of an edit as the classifier reads it with ``high_share_kept``, and the
    per-image flips (N,) bool, pred_after != pred_before."""
    pred_after = classifier.predict(after)
    row = edit_effects(before, after, pred_before, pred_after, cutoff, target)
    row["high_share_kept"] = high_share_kept(before, after, pred_before, pred_after, cutoff)
    return row, pred_after != pred_before


def effect_row(
    classifier: Any,
    before: Tensor,
    after: Tensor,
    pred_before: Tensor,
    cutoff: float,
    target: Tensor | None = None,
) -> dict[str, float | None]:
    """``edit_effects`` of an edit as the classifier reads it, and ``high_share_kept``."""
    return effect_and_flips(classifier, before, after, pred_before, cutoff, target)[0]


def composition_margin(diffs: Sequence[Tensor], chosen: int, z: float = 2.0) -> dict[str, Any]:
    """How far block ``chosen`` leads the runner-up, with a binomial-style interval.

    ``diffs[b]`` (N,): per image i of the ablation prompts (the same prompts and noise in every
    block), e_bi = flip_bi(feature ablation) - flip_bi(random control) in {-1, 0, 1}, so that
    block b's composition score is mean_i e_bi. With r the runner-up (the best other block) and
    d_i = e_chosen,i - e_r,i (paired):

        margin = mean_i d_i,   se = sd(d) / sqrt(N),   lower = margin - z se.

    ``lower`` > 0 says the lead is more than z standard errors, which one image never is: a lead
    of one image has se >= about 1/N."""
    n = len(diffs[chosen])
    others = [b for b in range(len(diffs)) if b != chosen]
    if not others or n < 2:
        return {"runner_up": None, "margin": None, "se": None, "lower": None, "n_images": n}
    runner = max(others, key=lambda b: float(diffs[b].float().mean()))
    d = diffs[chosen].double() - diffs[runner].double()
    margin, se = float(d.mean()), float(d.std() / np.sqrt(n))
    return {
        "runner_up": runner,
        "margin": margin,
        "se": se,
        "lower": margin - z * se,
        "n_images": n,
    }


def transfer_rows(
    x: Tensor, t: Tensor, sae_1step: SAE, sae_4step: SAE, mean: Tensor
) -> list[dict[str, float]]:
    """FVU per timestep of 4-step updates ``x`` (timesteps ``t``), from t = 999 down: of the
    1-step SAE, the SAE trained on 4-step updates, and the mean 1-step update (mean ablation)."""
    one = fvu_by_group(x, sae_codes(sae_1step, x)[1], t)
    four = fvu_by_group(x, sae_codes(sae_4step, x)[1], t)
    mean_fvu = fvu_by_group(x, mean.expand_as(x), t)
    return [
        {"t": k, "sae_1step": one[k], "sae_4step": four[k], "mean_ablation": mean_fvu[k]}
        for k in sorted(one, reverse=True)
    ]


# --- the measurements of one training budget ---------------------------------------------------
@dataclass
class PromptSet:
    """Captions drawn with sampling ``seed`` (1 step); ``targets``: each caption's steering target
    B (steering sets); ``images`` / ``pred``: the unedited images and their classes, if needed."""

    captions: list[str]
    seed: int
    labels: Tensor | None = None
    targets: Tensor | None = None
    images: Tensor | None = None
    pred: Tensor | None = None


@dataclass
class Bench:
    """What the measurements of every training budget share (``measure``): the sampler and
    classifier, the studied blocks and their tokens (``store_sites`` per set), the held-out prompts
    (``held_out``), the steering prompts per seed for evaluation (``steer``) and for picking the
    block (``steer_validation``, drawn with ``validation_seed``), the mean 1-step update per block,
    the seed-independent mean-ablation accuracies in 4-step sampling, and the edit settings."""

    generate: Generator
    classifier: Any
    sites: list[str]
    names: dict[str, str]
    tok: dict[str, dict[str, dict[str, Any]]]
    held_out: PromptSet
    steer: dict[int, PromptSet]
    steer_validation: dict[int, PromptSet]
    mean_update: dict[str, Tensor]
    mean_accuracy_4step: dict[str, float]
    n_classes: int
    n_features: int
    multiplier: float
    cutoff: float

    def accuracy(self, num_steps: int, edit: Any) -> float:
        """Class accuracy of the held-out prompts sampled in ``num_steps`` steps under ``edit``."""
        h = self.held_out
        images = self.generate(h.captions, num_steps, h.seed, edit=edit)
        return float((self.classifier.predict(images) == h.labels).float().mean())


def intervention_effects(b: Bench, seed: int, saes: dict, feats: dict, out: dict) -> None:
    """Per block: the class features turned off on the held-out prompts and the same-norm random
    control (``eff`` rows, and the per-image excess flips in ``flips``), class-B features turned on
    while prompting A and its random control, and the target rate of the same steering on the
    validation prompts (``steer_validation``, which picks the steering block)."""
    h, st, va = b.held_out, b.steer[seed], b.steer_validation[seed]
    flips, val = {}, {}
    for s in b.sites:
        sae, positions, d = saes[seed, s], b.tok[s]["train"]["P"], b.tok[s]["train"]["C"]
        mask = ablation_mask(feats[seed, s]["top"], h.labels, sae.cfg.d_sae)
        rand = random_unit(len(h.captions), d, 1000 + seed)
        got = {}
        for kind, kw in [("ablation", {}), ("random_ablation", {"random_ablate": rand})]:
            after = b.generate(
                h.captions, 1, h.seed, edit=(s, make_edit(sae, positions, mask, **kw))
            )
            row, got[kind] = effect_and_flips(b.classifier, h.images, after, h.pred, b.cutoff)
            out["eff"].append({"seed": seed, "block": b.names[s], "kind": kind, **row})
        flips[b.names[s]] = got["ablation"].float() - got["random_ablation"].float()
        dirs = unit_directions(sae)
        add = steer_vectors(feats[seed, s], dirs, st.targets, b.multiplier)
        radd = random_unit(len(st.captions), d, 2000 + seed)[:, None, :] * add.norm(
            dim=2, keepdim=True
        )
        for kind, vec in [("steering", add), ("random_steering", radd)]:
            after = b.generate(
                st.captions, 1, st.seed, edit=(s, make_edit(sae, positions, add=vec))
            )
            row = effect_row(b.classifier, st.images, after, st.pred, b.cutoff, st.targets)
            out["eff"].append({"seed": seed, "block": b.names[s], "kind": kind, **row})
        vadd = steer_vectors(feats[seed, s], dirs, va.targets, b.multiplier)
        after = b.generate(va.captions, 1, va.seed, edit=(s, make_edit(sae, positions, add=vadd)))
        val[b.names[s]] = float((b.classifier.predict(after) == va.targets).float().mean())
    out["flips"][seed], out["steer_validation"][seed] = flips, val


def transfer_measures(
    b: Bench, seed: int, saes: dict, saes4: dict, out: dict, splice_1step: bool
) -> None:
    """Per block: FVU per timestep of the 4-step held-out updates (1-step SAE, 4-step SAE, mean
    update), and the class accuracy with the 1-step SAE spliced into 4-step sampling (and, with
    ``splice_1step``, into 1-step sampling); then the splice into all blocks at once."""
    for s in b.sites:
        d4 = b.tok[s]["eval4"]
        for row in transfer_rows(d4["x"], d4["t"], saes[seed, s], saes4[seed, s], b.mean_update[s]):
            out["transfer"].append({"seed": seed, "block": b.names[s], **row})
        edit = (s, reconstruction_edit(saes[seed, s]))
        row = {"seed": seed, "block": b.names[s]}
        if splice_1step:
            row["acc_1step_sae_in_1step"] = b.accuracy(1, edit)
        row["acc_1step_sae_in_4step"] = b.accuracy(4, edit)
        row["acc_mean_ablation_in_4step"] = b.mean_accuracy_4step[s]
        out["splice"].append(row)
    all_sae = [(s, reconstruction_edit(saes[seed, s])) for s in b.sites]
    out["splice_all"][seed] = {"acc_1step_sae_all_blocks_in_4step": b.accuracy(4, all_sae)}


def measure(
    b: Bench, saes: dict, saes4: dict, seeds: Sequence[int], mean_rows: list, splice_1step: bool
) -> tuple[dict[str, Any], dict]:
    """Every SAE-dependent measurement of one training budget, for every seed: ``recon`` (FVU, L0,
    alive), ``eff`` (interventions; ``mean_rows``, the seed-independent mean ablations, are added
    for every seed), ``flips``, ``steer_validation``, ``transfer``, ``splice``, ``splice_all``;
    and the class features of every (seed, block). The same function serves the full budget and
    half of it, so both are measured alike (``splice_1step``: a diagnostic no claim reads)."""
    import pandas as pd

    out: dict[str, Any] = {"recon": [], "eff": [], "transfer": [], "splice": []}
    out |= {"flips": {}, "steer_validation": {}, "splice_all": {}}
    feats = {}
    for seed in seeds:
        for s in b.sites:
            train, held = b.tok[s]["train"], b.tok[s]["eval"]
            feats[seed, s] = class_features(saes[seed, s], train, b.n_classes, b.n_features)
            summary = recon_summary(saes[seed, s], held["x"], train["x"])
            out["recon"].append({"seed": seed, "block": b.names[s], **summary})
        out["eff"] += [{"seed": seed, **row} for row in mean_rows]
        intervention_effects(b, seed, saes, feats, out)
        transfer_measures(b, seed, saes, saes4, out, splice_1step)
    for key in ("recon", "eff", "transfer", "splice"):
        out[key] = pd.DataFrame(out[key])
    return out, feats


# --- metrics for the claims ---------------------------------------------------------------------
EFFECT_KINDS = ("ablation", "random_ablation", "mean_ablation", "steering", "random_steering")


def _none_if_nan(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)


def block_metrics(
    seed: int, b: str, eff: Any, recon: Any, transfer: Any, splice: Any
) -> dict[str, Any]:
    """One block's metrics for one seed from the tables (DataFrames) of the notebook: its
    reconstruction, every intervention's effects, transfer FVU per timestep, splice accuracies."""
    e = eff[(eff.seed == seed) & (eff.block == b)]
    r = recon[(recon.seed == seed) & (recon.block == b)].iloc[0]
    tr = transfer[(transfer.seed == seed) & (transfer.block == b)]
    sp = splice[(splice.seed == seed) & (splice.block == b)].iloc[0]
    skip = ("seed", "block", "kind")
    return {
        "fvu": float(r.fvu),
        "l0": float(r.l0),
        "alive_fraction": float(r.alive_fraction),
        **{
            kind: {
                c: _none_if_nan(v) for c, v in e[e.kind == kind].iloc[0].items() if c not in skip
            }
            for kind in EFFECT_KINDS
        },
        "transfer_fvu": {
            str(int(row.t)): {
                "sae_1step": row.sae_1step,
                "sae_4step": row.sae_4step,
                "mean_ablation": row.mean_ablation,
            }
            for row in tr.itertuples()
        },
        "splice": {c: float(sp[c]) for c in sp.index if c.startswith("acc")},
    }


def seed_metrics(
    seed: int,
    sites: Sequence[str],
    names: dict[str, str],
    tables: dict[str, Any],
    accuracies: dict[str, float],
) -> dict[str, Any]:
    """One seed's metrics: ``blocks`` (``block_metrics`` per studied block, keyed by its short
    name with "_"), the blocks' ``roles`` and the ``derived`` quantities the claims compare.

    ``tables``: ``measure``'s ``eff``, ``recon``, ``transfer``, ``splice`` DataFrames, ``flips``
    (seed -> block -> per-image excess flips), ``steer_validation`` (seed -> block -> target rate
    on the validation prompts) and ``splice_all`` (seed -> all-blocks splice accuracy);
    ``accuracies``: ``acc_1step``, ``acc_4step`` and ``acc_all_mean_4`` of the unedited and
    mean-ablated runs.

    The composition block is the argmax over blocks of the flip rate of feature ablation in excess
    of its same-norm random control, and ``composition_margin`` says by how much it leads the
    runner-up; the steering block is picked on the validation prompts and its target rate read on
    the evaluation prompts (``steer_target_rate``; the best block on the evaluation prompts
    themselves, ``steer_target_rate_max``, is biased upward by the pick and only reported).
    ``*_original_pick``: the block roles under the first definition (largest raw flip rate)."""
    eff, recon, transfer, splice = (tables[k] for k in ("eff", "recon", "transfer", "splice"))
    key = {s: names[s].replace(".", "_") for s in sites}
    blocks = {key[s]: block_metrics(seed, names[s], eff, recon, transfer, splice) for s in sites}
    abl = [blocks[key[s]]["ablation"] for s in sites]
    rnd = [blocks[key[s]]["random_ablation"] for s in sites]
    excess = [a["flip_rate"] - r["flip_rate"] for a, r in zip(abl, rnd)]
    comp_i = argmax_index(excess)
    raw_i = argmax_index([a["flip_rate"] for a in abl])
    det_i = argmax_index([a["high_share_kept"] for a in abl])
    steer = [blocks[key[s]]["steering"]["target_rate"] for s in sites]
    best_i = argmax_index(steer)
    st_i = argmax_index([tables["steer_validation"][seed][names[s]] for s in sites])
    diffs = [tables["flips"][seed][names[s]] for s in sites]
    lead = composition_margin(diffs, comp_i)
    steer_random = [blocks[key[s]]["random_steering"]["target_rate"] for s in sites]
    late = transfer[(transfer.seed == seed) & (transfer.t < 999)]
    rec, spl = recon[recon.seed == seed], splice[splice.seed == seed]
    comp_site = sites[comp_i]
    roles = {
        "composition_block": names[comp_site],
        "composition_block_raw_flips": names[sites[raw_i]],
        "detail_block": names[sites[det_i]] if det_i is not None else None,
        "composition_runner_up": None
        if lead["runner_up"] is None
        else names[sites[lead["runner_up"]]],
        "steering_block": names[sites[st_i]],
        "steering_block_best_on_eval": names[sites[best_i]],
    }
    derived = {
        "fvu_1step_mean": float(rec.fvu.mean()),
        "fvu_1step_max": float(rec.fvu.max()),
        "l0_over_d_in": float((rec.l0 / rec.d_in).max()),
        "blocks_differ": float(det_i is not None and comp_i != det_i),
        "composition_block_is_down": float("down_blocks" in comp_site),
        "composition_excess_flip_rate": excess[comp_i],
        "composition_margin": lead["margin"],
        "composition_margin_se": lead["se"],
        "composition_margin_lower": lead["lower"],
        "n_ablation_images": lead["n_images"],
        "blocks_differ_original_pick": float(det_i is not None and raw_i != det_i),
        "composition_block_is_down_original_pick": float("down_blocks" in sites[raw_i]),
        "composition_flip_rate": abl[comp_i]["flip_rate"],
        "composition_random_flip_rate": rnd[comp_i]["flip_rate"],
        "composition_flip_rate_min_block": min(a["flip_rate"] for a in abl),
        "ablation_flip_rate_mean": float(np.mean([a["flip_rate"] for a in abl])),
        "random_ablation_flip_rate_mean": float(np.mean([r["flip_rate"] for r in rnd])),
        "detail_high_share_kept": abl[det_i]["high_share_kept"] if det_i is not None else None,
        "composition_block_high_share_kept": abl[comp_i]["high_share_kept"],
        "steer_target_rate": steer[st_i],
        "steer_validation_target_rate": tables["steer_validation"][seed][names[sites[st_i]]],
        "steer_target_rate_max": steer[best_i],
        "n_steer_images": blocks[key[sites[st_i]]]["steering"]["n_images"],
        "steer_random_target_rate_same_block": steer_random[st_i],
        "steer_gain_over_random": steer[st_i] - steer_random[st_i],
        "steer_target_rate_mean": float(np.mean(steer)),
        "steer_random_target_rate_mean": float(np.mean(steer_random)),
        "transfer_fvu_1step_sae": float(late.sae_1step.mean()),
        "transfer_fvu_4step_sae": float(late.sae_4step.mean()),
        "transfer_fvu_mean_ablation": float(late.mean_ablation.mean()),
        "transfer_fvu_1step_over_mean_ablation": float(
            late.sae_1step.mean() / late.mean_ablation.mean()
        ),
        "accuracy_1step": accuracies["acc_1step"],
        "accuracy_4step": accuracies["acc_4step"],
        "accuracy_4step_1step_sae_mean": float(spl.acc_1step_sae_in_4step.mean()),
        "accuracy_4step_1step_sae_min": float(spl.acc_1step_sae_in_4step.min()),
        "accuracy_4step_mean_ablation_min": float(spl.acc_mean_ablation_in_4step.min()),
        "accuracy_4step_1step_sae_all_blocks": tables["splice_all"][seed][
            "acc_1step_sae_all_blocks_in_4step"
        ],
        "accuracy_4step_mean_ablation_all_blocks": accuracies["acc_all_mean_4"],
        "accuracy_1step_1step_sae_min": (
            float(spl.acc_1step_sae_in_1step.min()) if "acc_1step_sae_in_1step" in spl else None
        ),
    }
    return {"blocks": blocks, "roles": roles, "derived": derived}
