"""Concept unlearning with an SAE inside a diffusion U-Net (paper 17: Cywinski & Deja, ICML 2025,
"SAeUron: Interpretable concept unlearning in diffusion models with sparse autoencoders").

Activations. Every spatial position of a cross-attention block's feature map, at every denoising
step t, is one token x in R^d (here the block's residual update delta = block(h) - h, see
``common.models.diffusion``); a TopK SAE with AuxK is trained on them:

    z = TopK(W_enc (x - b_pre)),   x_hat = W_dec z + b_pre,   L = ||x - x_hat||^2 + alpha L_aux.

Concept score of feature i for concept c at step t (mu = mean activation over the tokens of the
prompts of c, D_c, or of all other concepts, D_not_c, at step t):

    score(i, t, c) = mu(i,t,D_c) / (sum_j mu(j,t,D_c) + delta)
                   - mu(i,t,D_not_c) / (sum_j mu(j,t,D_not_c) + delta)

and the tau features of largest score at step t form F_c(t).

Unlearning at inference: encode the token, and for i in F_c(t) with f_i(x) > mu(i,t,D) set

    f_i(x) <- gamma_c * mu(i,t,D_c) * f_i(x)        (gamma_c < 0),

decode and pass on; optionally the SAE's error x - SAE(x) is added back so that only the edit
changes the block's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from common.models.diffusion import (
    DiffusionModel,
    UNetTokens,
    capture_sites,
    load_tokens,
    replace_site,
    sample,
    save_tokens,
)
from common.sae import SAE


@dataclass
class SiteTokens:
    """Tokens of one U-Net site recorded during guided sampling.

    ``tokens`` (N, d); ``timesteps`` (N,) the diffusion timestep of each token; ``labels`` (N,)
    the class of the caption of its image; ``cond`` (N,) True for the conditional half of the
    classifier-free-guidance batch, False for the unconditional ("" caption) half.
    """

    tokens: Tensor
    timesteps: Tensor
    labels: Tensor
    cond: Tensor


@torch.no_grad()
def collect_tokens(
    model: DiffusionModel,
    site: str,
    captions: Sequence[str],
    labels: Tensor,
    store: str | Path,
    *,
    num_steps: int,
    guidance_scale: float,
    eta: float,
    seed: int,
    value: str = "update",
    metadata: dict[str, Any] | None = None,
) -> tuple[SiteTokens, Tensor]:
    """Sample ``captions`` once (one batch) while recording ``site``; returns tokens and images.

    The tokens go into an activation store at ``store`` (``save_tokens``: shards, manifest and
    checksums, with each token's timestep and row beside them) and are read back from it.
    """
    if len(labels) != len(captions):
        raise ValueError(f"{len(labels)} labels for {len(captions)} captions")
    with capture_sites(model.unet, [site], value=value) as cap:
        images = sample(
            model,
            captions,
            num_steps=num_steps,
            guidance_scale=guidance_scale,
            eta=eta,
            seed=seed,
            batch_size=len(captions),
        )
    save_tokens(cap, site, store, metadata)
    return site_tokens(load_tokens(store), labels), images


def site_tokens(saved: UNetTokens, labels: Tensor) -> SiteTokens:
    """``SiteTokens`` of one sampling batch of ``len(labels)`` captions.

    With guidance the U-Net sees 2n rows per call: row r < n is the unconditional input of
    caption r, row n + r its conditional input (``common.models.diffusion.sample``).
    """
    n, rows = len(labels), saved.rows
    guided = int(rows.max()) + 1 == 2 * n
    caption_of = rows % n if guided else rows
    return SiteTokens(
        tokens=saved.tokens,
        timesteps=saved.timesteps,
        labels=labels[caption_of],
        cond=rows >= n if guided else torch.ones_like(rows, dtype=torch.bool),
    )


@torch.no_grad()
def encode(sae: SAE, x: Tensor) -> Tensor:
    """SAE code z of raw tokens x (N, d), in the SAE's units (after ``scale_in``)."""
    return sae.encode(sae.scale_in(x))


@torch.no_grad()
def decode(sae: SAE, z: Tensor) -> Tensor:
    """Raw-unit reconstruction of a code z."""
    return sae.scale_out(sae.decode(z))


@torch.no_grad()
def sae_summary(sae: SAE, x: Tensor) -> dict[str, float]:
    """FVU = ||x - x_hat||^2 / ||x - mean(x)||^2, L0 and the share of features that ever fire."""
    z = encode(sae, x)
    err = (x - decode(sae, z)).pow(2).sum()
    return {
        "fvu": float(err / (x - x.mean(0)).pow(2).sum()),
        "l0": float((z > 0).sum(1).float().mean()),
        "alive_fraction": float((z > 0).any(0).float().mean()),
    }


@dataclass
class ActivationStats:
    """Per-timestep activation sums of every SAE feature, per class.

    ``timestep_values`` (T,) the timesteps in sampling order; ``sums`` (C, T, S) the sum of
    f_i over the conditional tokens of class c at step t; ``counts`` (C, T) the number of them.
    """

    timestep_values: Tensor
    sums: Tensor
    counts: Tensor

    def mean_class(self) -> Tensor:
        """mu(i, t, D_c): (C, T, S)."""
        return self.sums / self.counts.clamp_min(1)[..., None]

    def mean_all(self) -> Tensor:
        """mu(i, t, D) over all classes' tokens: (T, S)."""
        return self.sums.sum(0) / self.counts.sum(0).clamp_min(1)[..., None]

    def mean_rest(self) -> Tensor:
        """mu(i, t, D_not_c), the mean over the tokens of every other class: (C, T, S)."""
        rest_sum = self.sums.sum(0, keepdim=True) - self.sums
        rest_n = self.counts.sum(0, keepdim=True) - self.counts
        return rest_sum / rest_n.clamp_min(1)[..., None]

    def index(self, timesteps: Tensor) -> Tensor:
        """Position of each timestep in ``timestep_values``; unknown timesteps are an error."""
        table = {int(t): i for i, t in enumerate(self.timestep_values.tolist())}
        missing = sorted({int(t) for t in timesteps.unique().tolist()} - set(table))
        if missing:
            raise KeyError(
                f"timesteps {missing} have no statistics (known: {sorted(table)}); sample with "
                "the same number of steps as the activations the scores were computed on"
            )
        return torch.tensor([table[int(t)] for t in timesteps.tolist()], dtype=torch.long)


@torch.no_grad()
def activation_stats(
    sae: SAE, data: SiteTokens, n_classes: int, batch_size: int = 8192
) -> ActivationStats:
    """Accumulate ``ActivationStats`` over the conditional tokens of ``data`` in chunks."""
    keep = data.cond
    x, t, y = data.tokens[keep], data.timesteps[keep], data.labels[keep]
    values = torch.unique(t).flip(0)  # sampling order: from t = T - 1 down
    stats = ActivationStats(values, torch.zeros(n_classes, len(values), sae.cfg.d_sae), None)
    t_idx = stats.index(t)
    cell = y * len(values) + t_idx  # flat (class, step) index of each token
    sums = torch.zeros(n_classes * len(values), sae.cfg.d_sae)
    for lo in range(0, len(x), batch_size):
        z = encode(sae, x[lo : lo + batch_size])
        sums.index_add_(0, cell[lo : lo + batch_size], z)
    counts = torch.bincount(cell, minlength=n_classes * len(values)).float()
    stats.sums = sums.view(n_classes, len(values), -1)
    stats.counts = counts.view(n_classes, len(values))
    return stats


def concept_scores(stats: ActivationStats, delta: float = 1e-6) -> Tensor:
    """score(i, t, c) of the module docstring, for every class c, step t and feature i: (C, T, S).

    Each term is the share of the total mean activation that feature i takes on the tokens of c
    (resp. of the other classes); a feature that is relatively more active on c scores > 0.
    """
    mu_c, mu_rest = stats.mean_class(), stats.mean_rest()
    share_c = mu_c / (mu_c.sum(-1, keepdim=True) + delta)
    share_rest = mu_rest / (mu_rest.sum(-1, keepdim=True) + delta)
    return share_c - share_rest


def select_features(scores: Tensor, tau: int) -> Tensor:
    """Indices (C, T, tau) of the tau features of largest score per class and step."""
    if not 0 < tau <= scores.shape[-1]:
        raise ValueError(f"tau must be in [1, {scores.shape[-1]}], got {tau}")
    return scores.topk(tau, dim=-1).indices


def random_features(shape: tuple[int, int, int], d_sae: int, seed: int) -> Tensor:
    """Control: (C, T, tau) features drawn uniformly without replacement per (c, t)."""
    c, t, tau = shape
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(d_sae, generator=g)[:tau] for _ in range(c * t)]).view(
        c, t, tau
    )


class UnlearnEdit:
    """The ``fn(delta, t)`` for ``replace_site``: the SAE with SAeUron's edit of its code.

    For every class c in ``targets`` and step t, features i in ``features[c, t]`` whose activation
    exceeds mu(i, t, D) are multiplied by gamma * mu(i, t, D_c) (a feature chosen for several
    targets takes the most negative factor). ``keep_error`` adds the SAE's error x - SAE(x) back;
    without targets the block's update is then unchanged, and without ``keep_error`` it is the
    SAE reconstruction (the SAE spliced in).
    """

    def __init__(
        self,
        sae: SAE,
        stats: ActivationStats,
        features: Tensor,
        targets: Sequence[int],
        gamma: float,
        keep_error: bool = True,
    ) -> None:
        if gamma >= 0 and len(targets):
            raise ValueError(f"gamma must be negative (it flips the feature), got {gamma}")
        self.sae, self.stats, self.keep_error = sae, stats, keep_error
        n_t, s = len(stats.timestep_values), sae.cfg.d_sae
        mu_c, self.threshold = stats.mean_class(), stats.mean_all()  # (C,T,S), (T,S)
        self.factor = torch.ones(n_t, s)
        self.selected = torch.zeros(n_t, s, dtype=torch.bool)
        for c in targets:
            for ti in range(n_t):
                idx = features[c, ti]
                new = gamma * mu_c[c, ti, idx]
                self.factor[ti, idx] = torch.minimum(
                    torch.where(self.selected[ti, idx], self.factor[ti, idx], new), new
                )
                self.selected[ti, idx] = True
        self.edited_fraction: list[float] = []  # per call: share of tokens with an edited feature

    @torch.no_grad()
    def __call__(self, x: Tensor, timesteps: Tensor) -> Tensor:
        z = encode(self.sae, x)
        ti = self.stats.index(timesteps)
        mask = self.selected[ti] & (z > self.threshold[ti])
        z_edit = torch.where(mask, z * self.factor[ti], z)
        out = decode(self.sae, z_edit)
        if self.keep_error:
            out = out + (x - decode(self.sae, z))
        self.edited_fraction.append(float(mask.any(1).float().mean()))
        return out


def frechet_distance(a: Tensor, b: Tensor, eps: float = 1e-6) -> float:
    """||m_a - m_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}) of two feature sets (FID's formula)."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    m_a, m_b = a64.mean(0), b64.mean(0)
    s_a, s_b = np.cov(a64, rowvar=False), np.cov(b64, rowvar=False)
    s_a, s_b = np.atleast_2d(s_a), np.atleast_2d(s_b)
    offset = eps * np.eye(len(s_a))
    covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = np.real(covmean)
    return float(((m_a - m_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def class_rates(pred: Tensor, labels: Tensor, n_classes: int) -> Tensor:
    """acc[k] = P(pred == k | prompted class k): the classifier's hit rate per prompted class."""
    hit = (pred == labels).float()
    return torch.stack([hit[labels == k].mean() for k in range(n_classes)])


def unlearning_summary(
    rates: Tensor, baseline_rates: Tensor, targets: Sequence[int]
) -> dict[str, float]:
    """Unlearning accuracy (1 - hit rate on the targets) and retention on the other classes.

    ``retention`` is the mean hit rate of the non-target classes; ``retention_vs_baseline`` that
    mean over the same classes divided by its value in ``baseline_rates``.
    """
    n = len(rates)
    rest = [k for k in range(n) if k not in set(targets)]
    if not targets or not rest:
        raise ValueError(f"targets must be a non-empty proper subset of 0..{n - 1}, got {targets}")
    ua = 1 - rates[list(targets)].mean()
    ret = rates[rest].mean()
    return {
        "unlearning_accuracy": float(ua),
        "retention": float(ret),
        "retention_vs_baseline": float(ret / baseline_rates[rest].mean().clamp_min(1e-12)),
    }


def parse_groups(groups: Sequence[str], class_names: Sequence[str]) -> list[list[int]]:
    """``["sandal,sneaker,ankle boot", ...]`` -> class-index groups; unknown names are an error."""
    index = {name: k for k, name in enumerate(class_names)}
    out = []
    for g in groups:
        names = [s.strip() for s in g.split(",") if s.strip()]
        unknown = [s for s in names if s not in index]
        if unknown:
            raise ValueError(f"unknown class names {unknown} in group {g!r}; know {class_names}")
        out.append([index[s] for s in names])
    return out


def similar_and_dissimilar(target: int, groups: Sequence[Sequence[int]], n: int) -> tuple:
    """(classes in the target's group but not the target, classes in no group with it)."""
    mine = [g for g in groups if target in g]
    similar = sorted({k for g in mine for k in g} - {target})
    dissimilar = [k for k in range(n) if k != target and k not in similar]
    return similar, dissimilar


def selection_overlap(features: Tensor) -> np.ndarray:
    """(T, T): mean over classes of the Jaccard overlap of F_c(t) and F_c(t'), from (C, T, tau)."""
    n_c, n_t = features.shape[:2]
    jac = np.zeros((n_t, n_t))
    for a in range(n_t):
        for b in range(n_t):
            sa = [set(features[c, a].tolist()) for c in range(n_c)]
            sb = [set(features[c, b].tolist()) for c in range(n_c)]
            jac[a, b] = np.mean([len(x & y) / len(x | y) for x, y in zip(sa, sb)])
    return jac


# --- evaluation on fresh samples ----------------------------------------------------------------
class Evaluation:
    """Fresh samples of every class prompt (template 0, ``n_eval`` each, sampling ``seed``), with
    an optional edit of the block at ``site`` (``replace_site``), and the classifier's reading."""

    def __init__(
        self,
        model: DiffusionModel,
        clf: Any,
        site: str,
        value: str,
        *,
        n_eval: int,
        seed: int,
        num_steps: int,
        guidance_scale: float,
        eta: float,
    ) -> None:
        self.model, self.clf, self.site, self.value, self.seed = model, clf, site, value, seed
        self.n_classes = len(model.class_names)
        self.captions = [model.caption(c, 0) for c in range(self.n_classes) for _ in range(n_eval)]
        self.labels = torch.arange(self.n_classes).repeat_interleave(n_eval)
        self.sampling = {"num_steps": num_steps, "guidance_scale": guidance_scale, "eta": eta}

    def draw(
        self,
        fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        captions: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Images of ``captions`` (default: the evaluation prompts), edited by ``fn`` if given."""
        captions = self.captions if captions is None else captions
        seed = self.seed if seed is None else seed
        if fn is None:
            return sample(self.model, captions, seed=seed, **self.sampling)
        with replace_site(self.model.unet, self.site, fn, value=self.value):
            return sample(self.model, captions, seed=seed, **self.sampling)

    def evaluate(self, images: Tensor) -> dict[str, Tensor]:
        """The classifier's prediction, its confidence and its penultimate features."""
        logits = self.clf(images)
        return {
            "pred": logits.argmax(-1),
            "conf": logits.softmax(-1).max(-1).values,
            "feats": self.clf.embed(images),
        }

    def rates(self, result: dict[str, Tensor]) -> Tensor:
        """Hit rate per prompted class of the evaluation prompts (``class_rates``)."""
        return class_rates(result["pred"], self.labels, self.n_classes)

    def nontarget_quality(
        self, result: dict[str, Tensor], base: dict[str, Tensor], targets: Sequence[int]
    ) -> dict[str, float]:
        """Mean confidence and Frechet distance to the unedited samples, non-target prompts."""
        keep = ~torch.isin(self.labels, torch.tensor(list(targets)))
        return {
            "confidence": float(result["conf"][keep].mean()),
            "fd": frechet_distance(result["feats"][keep], base["feats"][keep]),
        }


def target_summary(rates: Tensor, base_rates: Tensor, targets: Sequence[int]) -> dict[str, float]:
    """UA of ``targets``, retention of the rest, and the unedited model's rate on the rest."""
    summary = unlearning_summary(rates, base_rates, targets)
    rest = [k for k in range(len(rates)) if k not in targets]
    return {
        "ua": summary["unlearning_accuracy"],
        "retention": summary["retention"],
        "retention_baseline": float(base_rates[rest].mean()),
    }


def interference(
    rates: Tensor, base_rates: Tensor, target: int, groups: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Retention of the target's similar and dissimilar classes, edited and unedited ({} when
    the target is in no group)."""
    sim, dis = similar_and_dissimilar(target, groups, len(rates))
    if not sim:
        return {}
    return {
        "similar_retention": float(rates[sim].mean()),
        "dissimilar_retention": float(rates[dis].mean()),
        "similar_baseline": float(base_rates[sim].mean()),
        "dissimilar_baseline": float(base_rates[dis].mean()),
    }


# --- metrics for the claims ---------------------------------------------------------------------
def _clean(obj: Any) -> Any:
    """Strict JSON: NaN / inf -> None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def seed_metrics(
    r: Any,
    sae_row: dict[str, float],
    names: Sequence[str],
    insert_targets: Sequence[str],
    base_rates: Tensor,
    base_conf: float,
    fd_floor: float,
) -> dict[str, Any]:
    """One seed's metrics from its rows ``r`` of the results table (a DataFrame): the SAE, per
    target, the multi-concept runs and the ``derived`` quantities the claims compare."""
    one, ins, multi = r[r.run == "unlearn"], r[r.run == "unlearn_insert"], r[r.run == "multi"]
    inter = one[one.similar_retention.notna()]
    derived = {
        "unlearning_accuracy": float(one.ua.mean()),
        "min_unlearning_accuracy": float(one.ua.min()),
        "unedited_unlearning_accuracy": float(1 - base_rates.mean()),
        "retention": float(one.retention.mean()),
        "retention_baseline": float(one.retention_baseline.mean()),
        "baseline_accuracy": float(base_rates.mean()),
        "spliced_accuracy": float(r[r.run == "spliced"].accuracy.iloc[0]),
        "spliced_insert_accuracy": float(r[r.run == "spliced_insert"].accuracy.iloc[0]),
        "confidence_nontarget": float(one.confidence.mean()),
        "confidence_baseline": base_conf,
        "fd_nontarget": float(one.fd.mean()),
        "fd_noise_floor": fd_floor,
        "multi_unlearning_accuracy": float(multi.ua.mean()),
        "multi_retention": float(multi.retention.mean()),
        "multi_retention_baseline": float(multi.retention_baseline.mean()),
        "similar_retention": float(inter.similar_retention.mean()),
        "dissimilar_retention": float(inter.dissimilar_retention.mean()),
        "similar_drop": float((inter.similar_baseline - inter.similar_retention).mean()),
        "dissimilar_drop": float((inter.dissimilar_baseline - inter.dissimilar_retention).mean()),
        "random_unlearning_accuracy": float(r[r.run == "random"].ua.mean()),
        "insert_unlearning_accuracy": float(ins.ua.mean()) if len(ins) else None,
        "insert_retention": float(ins.retention.mean()) if len(ins) else None,
        "keep_error_unlearning_accuracy_same_targets": float(
            one[one.targets.isin(list(insert_targets))].ua.mean()
        ),
        "edited_token_fraction": float(one.edited_fraction.mean()),
    }
    derived["ua_gain_over_random"] = (
        derived["unlearning_accuracy"] - derived["random_unlearning_accuracy"]
    )
    per = {}
    for name in names:
        row = one[one.targets == name].iloc[0]
        rand = r[(r.run == "random") & (r.targets == name)].ua.iloc[0]
        per[name] = {
            "ua": float(row.ua),
            "retention": float(row.retention),
            "random_ua": float(rand),
        }
    return _clean(
        {
            "sae": {k: float(v) for k, v in sae_row.items() if k != "seed"},
            "per_target": per,
            "multi": {
                row.targets: {"ua": row.ua, "retention": row.retention}
                for row in multi.itertuples()
            },
            "derived": derived,
        }
    )
