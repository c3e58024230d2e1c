"""Captured U-Net tokens in the activation store, with each token's timestep, row and caption.

``save_tokens(cap, site, folder)`` writes what ``capture_sites`` recorded at one site: the tokens
(B*H*W per U-Net call, C wide) go into a ``common.activations.store`` store (shards, manifest,
sha256 checksums; the manifest's metadata names the site, its value, the map's (C, H, W) and
whatever the caller adds), and the per-token metadata (``timesteps``, ``rows``, ``calls`` and,
for calls made by ``sample``, ``captions``) into ``tokens_meta.safetensors`` beside it, row for
row. ``load_tokens(folder)`` reads both back (checksums verified) as ``UNetTokens``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from common.activations.store import ActivationStore, ActivationStoreWriter
from common.models.diffusion.hooks import UNetCapture

META_FILE = "tokens_meta.safetensors"


@dataclass
class UNetTokens:
    """Tokens of one U-Net site (N, C) and, per token, its timestep, batch row, U-Net call and
    caption index (-1 on the unconditional rows of guidance; None if not sampled by ``sample``).
    ``shape`` is the block's (C, H, W): token n sits at position n % (H * W) of its row."""

    tokens: Tensor
    timesteps: Tensor
    rows: Tensor
    calls: Tensor
    captions: Tensor | None
    shape: tuple[int, int, int]
    metadata: dict[str, Any]

    @property
    def positions(self) -> int:
        """H * W, the tokens per row of a U-Net call."""
        return self.shape[1] * self.shape[2]


def save_tokens(
    cap: UNetCapture,
    site: str,
    folder: str | Path,
    metadata: dict[str, Any] | None = None,
    *,
    dtype: str = "float32",
) -> Path:
    """Write ``cap``'s tokens at ``site`` as a store in ``folder`` (replacing what was there) and
    their per-token metadata beside it; returns the folder. ``float32`` keeps them exact."""
    folder = Path(folder)
    tokens = cap[site]
    if not tokens:
        raise RuntimeError(f"nothing captured at {site!r}: run the U-Net inside `with`")
    shape = cap.shape(site)
    if folder.exists():
        shutil.rmtree(folder)
    info = {"site": site, "value": cap.value, "shape": list(shape), **(metadata or {})}
    with ActivationStoreWriter(folder, d=shape[0], dtype=dtype, metadata=info) as writer:
        for chunk in tokens:
            writer.append(chunk)
    meta = {"timesteps": cap.timesteps(site), "rows": cap.rows(site), "calls": cap.calls(site)}
    if all("captions" in m for m in cap.meta[site]):
        meta["captions"] = cap.captions(site)
    save_file({k: v.contiguous() for k, v in meta.items()}, str(folder / META_FILE))
    return folder


def load_tokens(folder: str | Path) -> UNetTokens:
    """The tokens and per-token metadata ``save_tokens`` wrote to ``folder``."""
    folder = Path(folder)
    store = ActivationStore(folder)
    meta = load_file(str(folder / META_FILE))
    wrong = {k: len(v) for k, v in meta.items() if len(v) != store.n_tokens}
    if wrong:
        raise ValueError(
            f"{folder}: {META_FILE} has {wrong} entries for a store of {store.n_tokens} tokens; "
            "write both again with save_tokens"
        )
    c, h, w = store.metadata["shape"]
    return UNetTokens(
        tokens=store.tensor(),
        timesteps=meta["timesteps"],
        rows=meta["rows"],
        calls=meta["calls"],
        captions=meta.get("captions"),
        shape=(int(c), int(h), int(w)),
        metadata=store.metadata,
    )


__all__ = ["META_FILE", "UNetTokens", "load_tokens", "save_tokens"]
