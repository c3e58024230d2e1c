"""The two frozen towers of the CLIP-style model and the pixels they read.

    image tower  f_I(x) : EfficientNet-Lite0 (ImageNet), final 1280 x h x w feature map
                          (h = w = 7 at 224 px: 49 "patch" tokens); pooled p_I = mean over positions
    text tower   f_T(s) : all-MiniLM-L6-v2, p_T = mean of the last hidden states over real tokens

Images: uint8 in [0, 255] or float in [0, 1]; shapes (B, H, W), (B, 1, H, W) or (B, 3, H, W); grey
images are replicated to 3 channels, everything is resized (bilinear, antialiased) to the tower's
``image_size`` (``to_pixels``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.hooks import tokens_from
from common.models.loading import LoadedModel


class ImageTokens(NamedTuple):
    """Patch tokens ``(B, h*w, C)`` of the final feature map and their mean ``(B, C)``.

    A CLS-first layout like a ViT's: ``torch.cat([t.pooled[:, None], t.patches], dim=1)``.
    """

    patches: Tensor
    pooled: Tensor


def to_pixels(images: Tensor | np.ndarray, size: int) -> Tensor:
    """Images -> float (B, 3, size, size) in [0, 1]: x / 255 for uint8, grey -> 3 channels, resize.

    Accepts (B, H, W), (B, 1, H, W) or (B, 3, H, W); uint8 in [0, 255] or float in [0, 1].
    Resizing is bilinear with antialiasing, as ``common.data.images.resize``.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, Tensor):
        raise TypeError(
            f"images must be a torch.Tensor or numpy array, got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        hint = " (one image? add a batch dimension: images[None])" if len(shape) == 2 else ""
        hint += (
            " (channels last? use images.permute(0, 3, 1, 2))" if shape[-1:] in ((1,), (3,)) else ""
        )
        raise ValueError(
            f"images must have shape (B, H, W), (B, 1, H, W) or (B, 3, H, W), got {shape}{hint}"
        )
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch (B = 0)")
    if images.dtype == torch.uint8:
        x = images.float() / 255.0
    elif images.is_floating_point():
        x = images.float()
        lo, hi = float(x.detach().min()), float(x.detach().max())
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(
                f"float images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; pass uint8 "
                "images, or divide 0..255 floats by 255"
            )
    else:
        raise TypeError(f"images must be uint8 or float, got dtype {images.dtype}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return x


class ImageTower:
    """Frozen EfficientNet-Lite0: pixels -> final 1280-channel map (after head conv, BN, swish).

    The map is what ``common.hooks`` calls site ``features``; EfficientNet's own global
    average pool of it is ``pooled``. Runs in channels-last memory format (same numbers to 3e-5;
    1.8x less CPU time at 224 px than contiguous on this machine).
    """

    def __init__(self, loaded: LoadedModel, image_size: int = 224) -> None:
        if not hasattr(loaded.model, "extract_features"):
            raise TypeError(
                f"{loaded.name} is not an EfficientNet (no extract_features); the image tower "
                "needs load_model('efficientnet-lite0')"
            )
        self.loaded = loaded
        self.model = loaded.model.to(memory_format=torch.channels_last)
        self.image_size = image_size

    @property
    def revision(self) -> str:
        return self.loaded.revision

    def feature_map(self, images: Tensor | np.ndarray) -> Tensor:
        """(B, 1280, h, w) for a batch of images (see ``to_pixels`` for accepted inputs)."""
        device = next(self.model.parameters()).device
        x = to_pixels(images, self.image_size).to(device)
        x = self.loaded.preprocess(x).contiguous(memory_format=torch.channels_last)
        return self.model.extract_features(x).contiguous()

    def tokens(self, images: Tensor | np.ndarray) -> ImageTokens:
        fmap = self.feature_map(images)
        return ImageTokens(tokens_from(fmap, "spatial"), fmap.mean(dim=(2, 3)))


class TextTower:
    """Frozen all-MiniLM-L6-v2: p_T = sum_t m_t h_t / sum_t m_t (mean over non-padding tokens)."""

    def __init__(self, loaded: LoadedModel, max_length: int = 64) -> None:
        if loaded.tokenizer is None:
            raise TypeError(f"{loaded.name} has no tokenizer: the text tower needs a text encoder")
        self.loaded = loaded
        self.model = loaded.model
        self.max_length = max_length

    @property
    def revision(self) -> str:
        return self.loaded.revision

    def features(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings (wrap a single string in a list)")
        if len(texts) == 0:
            raise ValueError("texts is empty")
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.loaded.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
        return torch.cat(out)


def _starts(images: Tensor | np.ndarray, batch_size: int) -> range:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return range(0, max(len(images), 1), batch_size)
