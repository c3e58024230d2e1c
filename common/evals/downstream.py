"""Downstream loss: the LM's next-token cross-entropy and KL with the SAE spliced in at its site.

For token windows ``ids`` (N x T) and a mask ``keep`` (N x T) of the positions the SAE is
evaluated on, four forward passes per batch differ only in what the site's tensor a_t becomes at
the kept positions t (excluded positions always keep their clean value):

    clean    a_t                        (no hook)
    sae      x_hat(a_t) = decode(encode(a_t))
    zero     0
    mean     mu = mean of a_t over all kept tokens of all windows (computed in a first pass)

With p(. | t) the next-token distribution at position t:

    CE      = mean over kept t < T-1 of  -log p(ids[t+1] | t)     (predictions *from* kept t)
    KL_run  = mean over kept t        of  sum_v p_clean(v|t) log(p_clean(v|t) / p_run(v|t))
    loss recovered (zero)  = (CE_zero - CE_sae) / (CE_zero - CE_clean)
    loss recovered (mean)  = (CE_mean - CE_sae) / (CE_mean - CE_clean)
    KL recovered           = (KL_zero - KL_sae) / KL_zero

Means are pooled over all tokens of all windows. These are SAELens's definitions
(``sae_lens.evals.get_recons_loss`` / ``get_downstream_reconstruction_metrics``: ``ce_loss_score``
and ``kl_div_score``) with its ``ignore_tokens`` mask replaced by ``keep``; ``tests/
test_evals_golden.py`` pins the numbers against SAELens. One difference in defaults: SAELens
zero-ablates the site at *every* position, including the ignored ones, while we ablate only at the
kept positions (the SAE is not responsible for the others, e.g. SmolLM2's position-0 attention sink
whose ablation wrecks the whole context). ``ablate_all_positions=True`` gives SAELens's convention.

Default ``keep``: ``TokenWindows.keep`` when windows from ``common.data.text.tokenize_windows`` are
passed, else every position except position 0 (the BOS).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common import hooks
from common.hooks import Site, resolve_site
from common.sae.base import SAE


def unwrap_model(model: Any) -> nn.Module:
    """The ``nn.Module`` of a ``LoadedModel`` (``common.models.load_model``), else ``model``."""
    return model.model if hasattr(model, "family") and hasattr(model, "revision") else model


def bos_token_id(tokenizer: Any) -> int | None:
    """The separator documents start with: BOS, else EOS, else CLS (as ``tokenize_windows``)."""
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def sequence_site(model: Any, site: str | Site) -> Site:
    """Resolve ``site`` and check it is a (B, T, d) site of a transformer (not a CNN map)."""
    resolved = site if isinstance(site, Site) else resolve_site(unwrap_model(model), site)
    if resolved.layout != "sequence" or resolved.transform is not None:
        raise ValueError(
            f"site {resolved.name!r} is a spatial CNN site; LM evaluations need a transformer "
            "site such as 'resid_post.3'"
        )
    return resolved


def _call(net: nn.Module, ids: Tensor, attention_mask: Tensor | None) -> Any:
    kwargs: dict[str, Any] = {"input_ids": ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if hasattr(getattr(net, "config", None), "use_cache"):
        kwargs["use_cache"] = False
    return net(**kwargs)


@torch.no_grad()
def site_activations(
    model: Any, site: str | Site, ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """The (B, T, d) tensor at ``site`` for token ids (B, T); the layers after it are skipped."""
    net = unwrap_model(model)
    resolved = sequence_site(net, site)
    device = model_device(net)
    mask = None if attention_mask is None else attention_mask.to(device)
    return hooks.run_until(net, [resolved], lambda: _call(net, ids.to(device), mask))[resolved.name]


def replace_at_site(site: Site, fn: Callable[[Tensor], Tensor]) -> AbstractContextManager[Site]:
    """While active, the site's tensor a (B, T, d) is replaced by ``fn(a)`` in every forward pass
    (``common.hooks.replace``)."""
    return hooks.replace(site.module, site, fn)


def _splice(keep: Tensor, values: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """a -> a with the rows a[keep] replaced by ``values(a[keep])`` (rows: (n_kept, d))."""

    def fn(a: Tensor) -> Tensor:
        if a.shape[:2] != keep.shape:
            raise ValueError(
                f"site tensor {tuple(a.shape)} does not match the keep mask {tuple(keep.shape)}"
            )
        out = a.clone()
        mask = keep.to(a.device)
        out[mask] = values(a[mask]).to(a.dtype)
        return out

    return fn


def sae_reconstruction(sae: SAE) -> Callable[[Tensor], Tensor]:
    """rows (n, d) -> scale_out(decode(encode(scale_in(rows)))), on the SAE's device and dtype.

    ``scale_in`` / ``scale_out`` map raw activations to the units the SAE was trained in and back
    (``input_scale``, set when the trainer normalises activations)."""
    param = next(sae.parameters())

    def fn(rows: Tensor) -> Tensor:
        x = sae.scale_in(rows.to(param.device, param.dtype))
        return sae.scale_out(sae.decode(sae.encode(x))).to(rows.device)

    return fn


@torch.no_grad()
def sae_codes(sae: SAE, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Codes z = encode(scale_in(x)) of raw rows ``x`` (n, d) in eval mode, batch by batch, as
    float32 on CPU."""
    was_training = sae.training
    sae.eval()
    param = next(sae.parameters())
    try:
        return torch.cat(
            [
                sae.encode(sae.scale_in(c.to(param.device, param.dtype))).float().cpu()
                for c in x.split(batch_size)
            ]
        )
    finally:
        sae.train(was_training)


def windows_and_keep(token_windows: Any, keep_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """(ids, keep) from a tensor of ids or ``TokenWindows``, with the documented default keep."""
    ids = getattr(token_windows, "ids", token_windows)
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
        raise ValueError(
            "token_windows must be integer token ids of shape (n_windows, context_len) or the "
            "TokenWindows of common.data.text.tokenize_windows"
        )
    if ids.shape[1] < 2:
        raise ValueError(f"windows need at least 2 tokens for next-token loss, got {ids.shape[1]}")
    if keep_mask is None:
        keep_mask = getattr(token_windows, "keep", None)
    if keep_mask is None:
        keep_mask = torch.ones_like(ids, dtype=torch.bool)
        keep_mask[:, 0] = False
    if keep_mask.shape != ids.shape:
        raise ValueError(
            f"keep_mask has shape {tuple(keep_mask.shape)}, token ids {tuple(ids.shape)}: they "
            "must match"
        )
    keep_mask = keep_mask.bool()
    if not keep_mask[:, :-1].any():
        raise ValueError("keep_mask keeps no position before the last one: nothing to evaluate")
    return ids, keep_mask


def _log_probs(logits: Tensor) -> Tensor:
    return F.log_softmax(logits.float(), dim=-1)


def _next_token_ce(logp: Tensor, ids: Tensor) -> Tensor:
    """-log p(ids[t+1] | t) for t < T-1: (B, T-1) from log-probs (B, T, V)."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)


def _kl(clean_logp: Tensor, logp: Tensor) -> Tensor:
    """KL(clean || run) per position, (B, T): sum_v p_clean (log p_clean - log p_run)."""
    return (clean_logp.exp() * (clean_logp - logp)).sum(-1)


@torch.no_grad()
def site_mean(
    model: Any, site: str | Site, ids: Tensor, keep: Tensor, batch_size: int = 4
) -> Tensor:
    """mu = mean of the site's tensor over the kept positions of all windows (float64 sums)."""
    total, count = None, 0
    for i in range(0, len(ids), batch_size):
        acts = site_activations(model, site, ids[i : i + batch_size])
        rows = acts[keep[i : i + batch_size].to(acts.device)].double()
        total = rows.sum(0) if total is None else total + rows.sum(0)
        count += len(rows)
    assert total is not None
    return (total / max(count, 1)).float()


@torch.no_grad()
def downstream_loss(
    model: Any,
    sae: SAE,
    site: str,
    token_windows: Any,
    keep_mask: Tensor | None = None,
    batch_size: int = 4,
    *,
    ablate_all_positions: bool = False,
) -> dict[str, float]:
    """CE / KL of the LM with the SAE spliced in at ``site``, and loss recovered (module docstring).

    ``model``: a causal LM (``LoadedModel`` or transformers ``nn.Module`` returning ``.logits``);
    ``token_windows``: ids (N, T) or ``TokenWindows``; ``keep_mask`` (N, T): positions where the
    SAE (and the ablations) replace the site's tensor; the others keep their clean value.
    Returns ``ce_clean, ce_sae, ce_zero_ablation, ce_mean_ablation, ce_loss_recovered,
    ce_loss_recovered_mean_ablation, kl_sae, kl_zero_ablation, kl_mean_ablation, kl_recovered,
    n_tokens``.
    """
    net = unwrap_model(model)
    resolved = sequence_site(net, site)
    ids, keep = windows_and_keep(token_windows, keep_mask)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mu = site_mean(net, resolved, ids, keep, batch_size)
    was_training = sae.training
    sae.eval()
    recon = sae_reconstruction(sae)
    runs: dict[str, Callable[[Tensor], Tensor]] = {
        "sae": recon,
        "zero_ablation": torch.zeros_like,
        "mean_ablation": lambda rows: mu.to(rows.device, rows.dtype).expand_as(rows),
    }
    ce_sums = dict.fromkeys(["clean", *runs], 0.0)
    kl_sums = dict.fromkeys(runs, 0.0)
    n_ce = n_kl = 0
    device = model_device(net)
    try:
        for i in range(0, len(ids), batch_size):
            batch, kept = ids[i : i + batch_size].to(device), keep[i : i + batch_size].to(device)
            clean_logp = _log_probs(_call(net, batch, None).logits)
            ce_mask, kl_mask = kept[:, :-1], kept
            ce_sums["clean"] += _next_token_ce(clean_logp, batch)[ce_mask].double().sum().item()
            for name, values in runs.items():
                ablate_everywhere = ablate_all_positions and name != "sae"
                where = torch.ones_like(kept) if ablate_everywhere else kept
                with replace_at_site(resolved, _splice(where, values)):
                    logp = _log_probs(_call(net, batch, None).logits)
                ce_sums[name] += _next_token_ce(logp, batch)[ce_mask].double().sum().item()
                kl_sums[name] += _kl(clean_logp, logp)[kl_mask].double().sum().item()
            n_ce += int(ce_mask.sum())
            n_kl += int(kl_mask.sum())
    finally:
        sae.train(was_training)

    ce = {name: total / n_ce for name, total in ce_sums.items()}
    kl = {name: total / n_kl for name, total in kl_sums.items()}

    def recovered(ablated: float, spliced: float, clean: float) -> float:
        gap = ablated - clean
        return (ablated - spliced) / gap if gap != 0 else float("nan")

    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero_ablation": ce["zero_ablation"],
        "ce_mean_ablation": ce["mean_ablation"],
        "ce_loss_recovered": recovered(ce["zero_ablation"], ce["sae"], ce["clean"]),
        "ce_loss_recovered_mean_ablation": recovered(ce["mean_ablation"], ce["sae"], ce["clean"]),
        "kl_sae": kl["sae"],
        "kl_zero_ablation": kl["zero_ablation"],
        "kl_mean_ablation": kl["mean_ablation"],
        "kl_recovered": recovered(kl["zero_ablation"], kl["sae"], 0.0),
        "n_tokens": float(n_ce),
    }
