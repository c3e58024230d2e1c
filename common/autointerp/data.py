"""Activations of a text model at one site *with their token ids*, for automatic interpretability.

The activation store keeps activations only; autointerp also needs which token each row is and
which window it came from. :func:`lm_activations` runs the same path as
``python -m common.activations.extract`` (``tokenize_windows`` -> ``extract`` with the window's
``keep`` mask and the in-window separators dropped) into memory, and returns the rows with their
token ids and document ids in the same row-major order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor


class _MemoryWriter:
    """The writer interface ``extract`` needs (``append``, ``tokens_written``, ``close``)."""

    def __init__(self) -> None:
        self.parts: list[Tensor] = []
        self.tokens_written = 0
        self.complete = False

    def append(self, rows: Tensor) -> None:
        self.parts.append(rows.detach().float().cpu())
        self.tokens_written += rows.shape[0]

    def close(self) -> None:
        self.complete = True


def lm_activations(
    loaded: Any,
    texts: Sequence[str],
    site: str,
    *,
    n_tokens: int,
    context_len: int = 64,
    drop_first: int = 1,
    batch_size: int = 16,
    keep_separators: bool = False,
    progress: bool = False,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """(acts (n, d), token_ids (n,), document ids (n,)) of ``n_tokens`` kept tokens at ``site``.

    Document ids change at every separator and every window start, so a context built from
    them (``build_records(sequence_ids=...)``) never joins two documents.

    ``loaded``: a ``common.models.LoadedModel`` with a tokenizer (or anything ``extract``
    accepts with a ``.tokenizer``). Position 0 of every window and, unless ``keep_separators``,
    the in-window document separators are dropped, as in the extraction CLI."""
    from common.activations.extract import extract, window_batches
    from common.data.text import tokenize_windows

    tokenizer = getattr(loaded, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("the model has no tokenizer: autointerp reads text models only")
    n_windows = math.ceil(n_tokens / max(context_len - drop_first, 1)) + 1
    while True:  # as the extraction CLI: grow the prefix of windows until enough tokens are kept
        windows = tokenize_windows(
            list(texts), tokenizer, context_len, drop_first=drop_first, max_windows=n_windows
        )
        keep = windows.keep
        if not keep_separators:
            keep = keep & (windows.ids != windows.ids[:, :1])
        kept = int(keep.sum())
        if kept >= n_tokens or len(windows.ids) < n_windows:
            break
        n_windows = math.ceil(n_windows * n_tokens / max(kept, 1)) + 1
    # a new document starts at every separator (the token each window starts with)
    doc = np.cumsum((windows.ids == windows.ids[:, :1]).numpy().ravel()).reshape(windows.ids.shape)
    writer = _MemoryWriter()
    extract(
        loaded,
        window_batches(windows.ids, keep, batch_size),
        [site],
        {site: writer},
        drop_first=drop_first,
        n_tokens=n_tokens,
        progress=progress,
    )
    acts = torch.cat(writer.parts)
    ids = windows.ids[keep].numpy()[: acts.shape[0]]
    seq = doc[keep.numpy()][: acts.shape[0]]
    if len(ids) != acts.shape[0]:
        raise RuntimeError(
            f"{acts.shape[0]} activation rows but {len(ids)} kept tokens: the extraction and the "
            "keep mask disagree"
        )
    return acts, ids.astype(np.int64), seq.astype(np.int64)
