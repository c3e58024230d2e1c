"""The output tokens a latent promotes and suppresses: its decoder direction through W_U.

For a latent with decoder direction ``d = W_dec[i]`` written into the residual stream of a causal
LM, the direct effect on the logits is ``W_U · norm(x + a d) - W_U · norm(x)``. To first order,
and for every token at once, the final norm's division by the residual's scale is one positive
number shared by all logits, so the *ranking* of tokens is that of

    RMSNorm (Llama, Qwen, SmolLM2):   W_U (g ⊙ d)            g = the norm's weight
    Gemma's RMSNorm:                  W_U ((1 + g) ⊙ d)      (Gemma stores the weight minus 1)
    LayerNorm (GPT-2, Pythia):        W_U (g ⊙ (d - mean(d)))  (its bias adds the same vector to
                                                               every latent and is left out)

This is the "logit lens" of the decoder direction (Bricken et al. 2023, "Towards
Monosemanticity", the "logit weights" of each feature; Neuronpedia's positive / negative logits),
with the final norm's elementwise scale folded in, which the usual ``W_dec @ W_U`` omits: a
norm weight far from 1 on some dimensions would otherwise reorder the tokens.

The SAE's input scale c (``SAE.scale_out``) multiplies every direction by the same 1/c: it does
not change the ranking, so ``W_dec`` is used as stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def final_norm(model: nn.Module) -> tuple[Tensor | None, str]:
    """(elementwise scale, kind) of a causal LM's final norm: kind is ``rms``, ``layer`` or
    ``none``; the scale is already ``1 + weight`` for Gemma's RMSNorm."""
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_layernorm"):
        norm = getattr(base, name, None)
        if isinstance(norm, nn.Module) and getattr(norm, "weight", None) is not None:
            weight = norm.weight.detach().float()
            cls = type(norm).__name__
            if isinstance(norm, nn.LayerNorm) or "LayerNorm" in cls:
                return weight, "layer"
            if "Gemma" in cls:
                return 1.0 + weight, "rms"
            return weight, "rms"
    return None, "none"


def unembedding(model: nn.Module) -> Tensor:
    """The (vocab, d) unembedding matrix W_U of a transformers causal LM."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"{type(model).__name__} has no output embedding (lm_head): promoted tokens need a "
            "causal LM"
        )
    return head.weight.detach().float()


def direction_logits(
    directions: Tensor | np.ndarray,
    w_u: Tensor | np.ndarray,
    norm_scale: Tensor | np.ndarray | None = None,
    norm_kind: str = "rms",
) -> Tensor:
    """(m, vocab) logit effects of (m, d) directions: ``W_U (g ⊙ d)``, centred first for a
    LayerNorm (see the module docstring)."""
    d = torch.as_tensor(
        np.asarray(directions) if not isinstance(directions, Tensor) else directions
    )
    d = d.detach().float()
    w = torch.as_tensor(w_u if isinstance(w_u, Tensor) else np.asarray(w_u)).float()
    if d.ndim != 2 or w.ndim != 2 or d.shape[1] != w.shape[1]:
        raise ValueError(
            f"directions (m, d) and W_U (vocab, d) must share d, got {tuple(d.shape)} and "
            f"{tuple(w.shape)}"
        )
    if norm_kind == "layer":
        d = d - d.mean(1, keepdim=True)
    elif norm_kind not in ("rms", "none"):
        raise ValueError(f"norm_kind must be 'rms', 'layer' or 'none', got {norm_kind!r}")
    if norm_scale is not None and norm_kind != "none":
        g = torch.as_tensor(
            np.asarray(norm_scale) if not isinstance(norm_scale, Tensor) else norm_scale
        )
        d = d * g.float()
    return d @ w.T


def top_logit_tokens(
    directions: Tensor | np.ndarray,
    w_u: Tensor | np.ndarray,
    tokenizer: Any,
    *,
    latents: Sequence[int] | None = None,
    norm_scale: Tensor | np.ndarray | None = None,
    norm_kind: str = "rms",
    k: int = 10,
    batch: int = 256,
) -> dict[int, dict[str, list[tuple[str, float]]]]:
    """Per latent, the ``k`` tokens it promotes most and suppresses most:
    ``{latent: {"promoted": [(token, logit), ...], "suppressed": [...]}}``.

    ``directions`` is the full (d_sae, d) decoder (``sae.decoder_directions``); ``latents``
    selects rows (default all); ``tokenizer`` decodes ids (``decode([id])``) or is a list."""
    d_all = torch.as_tensor(
        np.asarray(directions) if not isinstance(directions, Tensor) else directions
    )
    rows = list(range(d_all.shape[0])) if latents is None else [int(i) for i in latents]
    out: dict[int, dict[str, list[tuple[str, float]]]] = {}
    for s in range(0, len(rows), batch):
        chunk = rows[s : s + batch]
        logits = direction_logits(d_all[chunk], w_u, norm_scale, norm_kind)
        kk = min(k, logits.shape[1])
        top, bottom = logits.topk(kk, dim=1), (-logits).topk(kk, dim=1)
        for j, latent in enumerate(chunk):
            out[latent] = {
                "promoted": [
                    (_decode(tokenizer, int(t)), round(float(v), 3))
                    for t, v in zip(top.indices[j], top.values[j])
                ],
                "suppressed": [
                    (_decode(tokenizer, int(t)), round(float(-v), 3))
                    for t, v in zip(bottom.indices[j], bottom.values[j])
                ],
            }
    return out


def model_logit_tokens(
    model: nn.Module,
    tokenizer: Any,
    directions: Tensor | np.ndarray,
    *,
    latents: Sequence[int] | None = None,
    k: int = 10,
) -> dict[int, dict[str, list[tuple[str, float]]]]:
    """:func:`top_logit_tokens` with W_U and the final norm read from a transformers causal LM.

    Only meaningful for a residual-stream site (``resid_post.L``, or ``mlp_out.L`` /
    ``attn_out.L`` whose outputs are added to it)."""
    scale, kind = final_norm(model)
    return top_logit_tokens(
        directions, unembedding(model), tokenizer, latents=latents, norm_scale=scale,
        norm_kind=kind, k=k,
    )  # fmt: skip


def _decode(tokenizer: Any, token: int) -> str:
    if isinstance(tokenizer, Sequence) and not isinstance(tokenizer, str):
        return str(tokenizer[token])
    return tokenizer.decode([token])
