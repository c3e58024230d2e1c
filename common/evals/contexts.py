"""Top-activating contexts of SAE latents, saved for notebooks to show (the usual latent "card").

For each requested latent i, over all kept positions (window w, position t) of the token windows:

    z_i(w, t) = encode(a(w, t))_i          a = the site's activation, encode in eval mode

the ``n`` largest positive z_i(w, t) are kept (ties in any order), each
with the tokens ``ids[w, t - context : t + after + 1]`` decoded one by one and the position t
highlighted as ``<<token>>`` in ``text``. ``frequency`` is the fraction of kept positions where the
latent fires (z_i > 0). The result holds only str / int / float / list / dict: ``json.dumps`` it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from common.evals.downstream import sae_codes, sequence_site, site_activations, windows_and_keep
from common.sae.base import SAE

HIGHLIGHT = ("<<", ">>")


def _decode_tokens(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [str(i) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]


@torch.no_grad()
def top_activating_contexts(
    sae: SAE,
    model: Any,
    site: str,
    token_windows: Any,
    latents: Sequence[int],
    n: int = 10,
    context: int = 8,
    *,
    after: int = 2,
    tokenizer: Any = None,
    keep_mask: Tensor | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Per latent: its top-``n`` activations with their decoded contexts (module docstring).

    ``token_windows``: ids (N, T) or ``TokenWindows``; ``keep_mask`` defaults as in
    ``common.evals.downstream`` (the windows' ``keep``, else every position but the first).
    ``tokenizer`` defaults to ``model.tokenizer`` (a ``LoadedModel``); without one, tokens are
    shown as ids. Returns ``{"site", "n_tokens", "latents": {str(i): {"frequency",
    "max_activation", "examples": [{"activation", "window", "position", "tokens",
    "highlight", "text"}, ...]}}}``; ``tokens[highlight]`` is the token at the maximum.
    """
    if n <= 0 or context < 0 or after < 0:
        raise ValueError(f"need n > 0, context >= 0, after >= 0; got {n}, {context}, {after}")
    latents = [int(i) for i in latents]
    bad = [i for i in latents if not 0 <= i < sae.cfg.d_sae]
    if bad:
        raise ValueError(f"latents {bad} out of range for an SAE with d_sae={sae.cfg.d_sae}")
    if not latents:
        raise ValueError("no latents given")
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    resolved = sequence_site(model, site)
    ids, keep = windows_and_keep(token_windows, keep_mask)
    index = torch.tensor(latents)

    # Running top-n per latent: values (n_latents, <=n) and flat token positions w * T + t.
    best_val = torch.empty(len(latents), 0)
    best_pos = torch.empty(len(latents), 0, dtype=torch.long)
    fires = torch.zeros(len(latents))
    n_tokens = 0
    width = ids.shape[1]
    for start in range(0, len(ids), batch_size):
        kept = keep[start : start + batch_size]
        acts = site_activations(model, resolved, ids[start : start + batch_size])
        z = sae_codes(sae, acts[kept.to(acts.device)].float())[:, index].t()  # (n_latents, rows)
        where = kept.nonzero()  # (rows, 2), row-major like the boolean index above
        flat = (where[:, 0] + start) * width + where[:, 1]
        fires += (z > 0).float().sum(1)
        n_tokens += z.shape[1]
        val = torch.cat([best_val, z], dim=1)
        pos = torch.cat([best_pos, flat.expand(len(latents), -1)], dim=1)
        top = val.topk(min(n, val.shape[1]), dim=1, sorted=True)
        best_val, best_pos = top.values, pos.gather(1, top.indices)

    out: dict[str, Any] = {"site": resolved.name, "n_tokens": n_tokens, "latents": {}}
    for row, latent in enumerate(latents):
        examples = []
        for value, position in zip(best_val[row].tolist(), best_pos[row].tolist(), strict=True):
            if value <= 0:
                break
            w, t = divmod(int(position), width)
            lo, hi = max(0, t - context), min(width, t + after + 1)
            tokens = _decode_tokens(tokenizer, ids[w, lo:hi].tolist())
            mark = t - lo
            text = (
                "".join(tokens[:mark])
                + HIGHLIGHT[0]
                + tokens[mark]
                + HIGHLIGHT[1]
                + "".join(tokens[mark + 1 :])
            )
            examples.append(
                {
                    "activation": float(value),
                    "window": w,
                    "position": t,
                    "tokens": tokens,
                    "highlight": mark,
                    "text": text,
                }
            )
        out["latents"][str(latent)] = {
            "frequency": float(fires[row] / max(n_tokens, 1)),
            "max_activation": examples[0]["activation"] if examples else 0.0,
            "examples": examples,
        }
    return out
