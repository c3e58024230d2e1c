"""Vision latents for the browser: top images with per-patch heat-maps (as in PatchSAE, Lim et al.
2025, and the Sparse Autoencoder feature dashboards for ViTs).

Inputs are plain arrays: images (n, H, W, 3) / (n, 3, H, W) / (n, H, W), floats in [0, 1] or
uint8, and per-patch latent activations (n, h, w, m) or (n, h * w, m) (a square patch grid), the
activations of m latents (any basis) on each patch. An image's activation is its maximum over
patches; the heat-map is the patch map upsampled to the image (nearest, so patches stay visible),
drawn over the greyed image with a transparent-to-red ramp scaled by the latent's maximum.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class ImageExample:
    """One image of a latent's panel: PNG data URIs of the image and of its heat-map overlay."""

    image: str
    overlay: str
    max_act: float
    index: int


@dataclass
class ImageLatent:
    """A vision latent: statistics over patches and its top images."""

    latent: int
    method: str
    frequency: float
    max_activation: float
    top: list[ImageExample]
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    explanation: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hwc_uint8(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"an image must be (H, W, 3), (3, H, W) or (H, W), got {np.shape(image)}")
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255 + 0.5).astype(np.uint8)
    return a


def png_data_uri(rgb: np.ndarray) -> str:
    """An (H, W, 3) or (H, W, 4) uint8 array as a ``data:image/png;base64,`` URI."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def heatmap_overlay(image: np.ndarray, patch_map: np.ndarray, vmax: float) -> np.ndarray:
    """The image (greyed to 60%) with the patch map, upsampled to its size, in red on top."""
    rgb = _hwc_uint8(image).astype(np.float64) / 255.0
    h, w = rgb.shape[:2]
    pm = np.asarray(patch_map, dtype=np.float64)
    ry, rx = int(np.ceil(h / pm.shape[0])), int(np.ceil(w / pm.shape[1]))
    up = np.kron(pm, np.ones((ry, rx)))[:h, :w]
    alpha = np.clip(up / max(vmax, 1e-12), 0.0, 1.0)[..., None] * 0.75
    grey = rgb.mean(-1, keepdims=True) * 0.6 + rgb * 0.4
    red = np.array([1.0, 0.1, 0.05])
    out = grey * (1 - alpha) + red * alpha
    return (out * 255 + 0.5).astype(np.uint8)


def _patch_grid(patch_acts: np.ndarray) -> np.ndarray:
    a = np.asarray(patch_acts, dtype=np.float32)
    if a.ndim == 4:
        return a
    if a.ndim == 3:
        side = int(round(np.sqrt(a.shape[1])))
        if side * side != a.shape[1]:
            raise ValueError(
                f"{a.shape[1]} patches are not a square grid; pass (n, h, w, m) activations"
            )
        return a.reshape(a.shape[0], side, side, a.shape[2])
    raise ValueError(f"patch activations must be (n, h, w, m) or (n, h*w, m), got {a.shape}")


def image_latents(
    images: np.ndarray | Sequence[np.ndarray],
    patch_acts: np.ndarray,
    *,
    latents: Sequence[int] | None = None,
    n_top: int = 8,
    method: str = "sae",
    n_hist_bins: int = 30,
    display_size: int | None = None,
) -> list[ImageLatent]:
    """Per latent, its firing frequency over patches, histogram and ``n_top`` images with the
    highest patch activation, as inline PNGs (``display_size`` upsamples small images, nearest,
    before encoding; default: as they are)."""
    grid = _patch_grid(patch_acts)
    n, _, _, m = grid.shape
    if len(images) != n:
        raise ValueError(f"{len(images)} images but patch activations for {n}")
    chosen = range(m) if latents is None else [int(i) for i in latents]
    out = []
    for latent in chosen:
        if not 0 <= latent < m:
            raise ValueError(f"latent {latent} is outside [0, {m})")
        maps = grid[..., latent]
        per_image = maps.reshape(n, -1).max(1)
        vmax = float(per_image.max()) if n else 0.0
        order = np.argsort(-per_image, kind="stable")[:n_top]
        top = []
        for i in order:
            if per_image[i] <= 0:
                break
            img = _hwc_uint8(images[i])
            if display_size and img.shape[0] < display_size:
                f = int(np.ceil(display_size / img.shape[0]))
                img = np.kron(img, np.ones((f, f, 1), dtype=np.uint8))
            overlay = png_data_uri(heatmap_overlay(img, maps[i], vmax))
            top.append(
                ImageExample(png_data_uri(img), overlay, round(float(per_image[i]), 4), int(i))
            )
        positive = maps[maps > 0]
        hist, edges = np.histogram(positive, bins=n_hist_bins) if positive.size else ([], [])
        out.append(
            ImageLatent(
                latent=latent,
                method=method,
                frequency=float((maps > 0).mean()),
                max_activation=vmax,
                top=top,
                hist_counts=[int(c) for c in hist],
                hist_edges=[float(e) for e in edges],
            )
        )
    return out
