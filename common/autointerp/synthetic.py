"""Toy token data with known latents, for tests and demos of autointerp and the feature browser.

A random word stream (Zipf-like frequencies) over a small vocabulary; the activation of token t
is ``s_t [onehot(w_t), onehot(w_{t-1})]`` (current and previous word, d = 2 V) with a per-token
scale ``s_t`` in [1, 1.4], and a ReLU SAE from ``common.sae`` whose latents are known:

* *token latents*: latent j fires (``s_t - 0.5``) exactly on word ``TOKEN_WORDS[j]``;
* *context latents*: fire (``2 s_t - 1.5``) on word ``w`` only right after ``" the"``; the word
  elsewhere does not fire it (``s_t - 1.5 < 0``), which makes the close negatives real.

A good explanation of a token latent names its word; the random-explanation control names
another latent's word; a top-tokens explanation of a context latent is fooled by the close
negatives ("dog" without "the" before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

WORDS = (
    "the cat dog sat on mat ran fast slow red blue green house tree river stone bird fish "
    "sky rain sun moon star night day king queen ship road city hill wind fire water light "
    "dark old new big small happy sad cold warm bread milk apple book pen door window car"
).split()
TOKEN_WORDS = ("cat", "river", "king", "apple", "moon", "ship", "bread", "window")
CONTEXT_WORDS = ("dog", "tree")


@dataclass
class ToyData:
    """Activations (n, 2V), their token ids and sequence ids, the vocabulary (token strings),
    the SAE, and per latent the word it reads (``"the dog"`` for context latents)."""

    acts: torch.Tensor
    token_ids: np.ndarray
    sequence_ids: np.ndarray
    vocab: list[str]
    sae: torch.nn.Module
    latent_words: list[str]


def toy_data(n_tokens: int = 6000, seq_len: int = 64, seed: int = 0) -> ToyData:
    """The toy stream and its SAE (``len(TOKEN_WORDS) + len(CONTEXT_WORDS)`` latents)."""
    from common.sae.registry import build_sae

    rng = np.random.default_rng(seed)
    vocab = [" " + w for w in WORDS]
    v = len(vocab)
    p = 1.0 / np.arange(1, v + 1) ** 0.6
    p[0] = p.max() * 3  # " the" is common, so "the dog" occurs
    p /= p.sum()
    ids = rng.choice(v, size=n_tokens, p=p)
    seq = np.arange(n_tokens) // seq_len
    prev = np.roll(ids, 1)
    prev[np.arange(n_tokens) % seq_len == 0] = -1
    scale = rng.uniform(1.0, 1.4, size=n_tokens).astype(np.float32)
    x = np.zeros((n_tokens, 2 * v), dtype=np.float32)
    x[np.arange(n_tokens), ids] = 1.0
    has_prev = prev >= 0
    x[np.flatnonzero(has_prev), v + prev[has_prev]] = 1.0
    x *= scale[:, None]

    index = {w.strip(): i for i, w in enumerate(vocab)}
    d_sae = len(TOKEN_WORDS) + len(CONTEXT_WORDS)
    sae = build_sae("relu", d_in=2 * v, d_sae=d_sae)
    w_enc = torch.zeros(2 * v, d_sae)
    b_enc = torch.zeros(d_sae)
    words = []
    for j, w in enumerate(TOKEN_WORDS):
        w_enc[index[w], j], b_enc[j] = 1.0, -0.5
        words.append(w)
    for k, w in enumerate(CONTEXT_WORDS):
        j = len(TOKEN_WORDS) + k
        w_enc[index[w], j], w_enc[v + index["the"], j], b_enc[j] = 1.0, 1.0, -1.5
        words.append("the " + w)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.b_enc.copy_(b_enc)
        if hasattr(sae, "W_dec"):
            sae.W_dec.copy_(torch.nn.functional.normalize(w_enc.t(), dim=1))
        sae.b_dec.zero_()
    return ToyData(torch.from_numpy(x), ids, seq, vocab, sae.eval(), words)
