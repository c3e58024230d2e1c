"""Which document (and so which WordNet label) each token of an activation store came from.

The store (``common.activations.store``) keeps activation rows only. But extraction is a pure
function of the manifest's metadata (corpus, split, seed, max_docs, context_len, drop_first,
drop_separators, n_tokens): ``common.data.text.tokenize_windows`` concatenates the documents as
``[sep] + tokens(doc)`` into one stream, cuts it into windows of ``context_len - 1`` stream tokens
each preceded by ``sep``, and ``common.activations.extract`` keeps, in row-major order, the
positions ``t >= drop_first`` that are not a separator, up to ``n_tokens``. Replaying that on the
document *indices* instead of the activations gives row ``r``'s document without a forward pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TokenLabels:
    """Per stored row: its document index, token id and the document's label."""

    doc: np.ndarray  # (n_rows,) int, index into ``labels`` / ``texts``
    token: np.ndarray  # (n_rows,) int, the token id at that position
    labels: list[str]  # one per document of the corpus split
    texts: list[str]


def _separator(tokenizer: Any) -> int:
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):  # as common.data.text
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("the tokenizer has no BOS, EOS or CLS token to separate documents")


def store_token_labels(store_dir: str | Path, tokenizer: Any) -> TokenLabels:
    """Replay the extraction of ``store_dir`` on document indices (module docstring)."""
    from common.data.text import load_corpus

    manifest = json.loads((Path(store_dir) / "manifest.json").read_text())
    meta = manifest["metadata"]
    n_rows = sum(shard["n_tokens"] for shard in manifest["shards"])
    corpus = load_corpus(meta["corpus"], meta["split"], meta["seed"], meta["max_docs"])
    body, drop_first = meta["context_len"] - 1, meta["drop_first"]
    sep = _separator(tokenizer)
    stream_tok: list[int] = []
    stream_doc: list[int] = []
    n_docs_tokens = 0  # non-separator tokens in the stream so far
    for start in range(0, len(corpus.texts), 256):
        encoded = tokenizer(corpus.texts[start : start + 256], add_special_tokens=False)
        for offset, ids in enumerate(encoded["input_ids"]):
            stream_tok.extend([sep, *ids])
            stream_doc.extend([-1] + [start + offset] * len(ids))
            n_docs_tokens += len(ids)
        # a lower bound on the rows kept from complete windows: stop once it covers the store
        n_windows = len(stream_tok) // body
        if n_docs_tokens - body - n_windows * max(drop_first - 1, 0) >= n_rows:
            break
    n_windows = len(stream_tok) // body
    tok = np.asarray(stream_tok[: n_windows * body]).reshape(n_windows, body)
    doc = np.asarray(stream_doc[: n_windows * body]).reshape(n_windows, body)
    tok = np.concatenate([np.full((n_windows, 1), sep), tok], axis=1)
    doc = np.concatenate([np.full((n_windows, 1), -1), doc], axis=1)
    keep = np.ones_like(tok, dtype=bool)
    keep[:, :drop_first] = False
    if meta.get("drop_separators", True):
        keep &= tok != tok[:, :1]
    rows_doc, rows_tok = doc[keep][:n_rows], tok[keep][:n_rows]
    if len(rows_doc) != n_rows:
        raise ValueError(f"{store_dir}: replay gives {len(rows_doc)} rows, the store has {n_rows}")
    return TokenLabels(rows_doc, rows_tok, list(corpus.labels), list(corpus.texts))
