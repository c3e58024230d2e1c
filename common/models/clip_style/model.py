"""The CLIP-style dual encoder: trainable heads (W_I, W_T, t) over the frozen towers.

    heads        e_I = normalize(W_I (p_I - mu_I) / sigma_I),  W_I: 1280 -> D
                 e_T = normalize(W_T (p_T - mu_T) / sigma_T),  W_T:  384 -> D   (D = 256)
    similarity   s_ij = exp(t) <e_I_i, e_T_j>,  t learnable, t_0 = log(1 / 0.07), t <= log(100)

mu and sigma are fixed per-channel statistics of the training features (standardisation, stored
with the heads). A run folder holds the heads (``clip_style.safetensors``) and ``config.json``;
the towers load with ``load_model`` on first use. Zero-shot classification is CLIP's: the class
embedding is the normalised mean of e_T over the prompt templates (``zero_shot_weights``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from common.models.clip_style.towers import ImageTokens, ImageTower, TextTower, _starts
from common.models.loading import load_model

if TYPE_CHECKING:
    from common.models.clip_style.hub import HubCLIP

WEIGHTS_FILE = "clip_style.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class CLIPStyleConfig:
    """Shapes and towers of a CLIP-style model; ``*_revision`` pin the tower weights trained on."""

    d_embed: int = 256
    image_size: int = 224
    image_model: str = "efficientnet-lite0"
    text_model: str = "minilm-l6"
    d_image: int = 1280
    d_text: int = 384
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = math.log(100.0)
    text_max_length: int = 64
    image_model_revision: str | None = None
    text_model_revision: str | None = None

    def __post_init__(self) -> None:
        for name in ("d_embed", "image_size", "d_image", "d_text", "text_max_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.image_size < 32:
            raise ValueError(
                f"`image_size` {self.image_size} is too small: EfficientNet downsamples 32x, use "
                ">= 32 (224 gives the 7x7 map of 49 patch tokens)"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLIPStyleConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CLIPStyleConfig keys {unknown}; valid: {sorted(known)}")
        return cls(**data)


class CLIPStyleModel(nn.Module):
    """Trainable heads (W_I, W_T, t) over frozen towers; see the module docstring for equations.

    ``state_dict`` holds the heads and their feature statistics only. The towers are loaded with
    ``load_model`` on first use (or passed in, to share one copy between models) and are moved by
    ``.to(device)`` with the heads. Their revisions must match the ones the heads were trained on.
    """

    def __init__(
        self,
        cfg: CLIPStyleConfig | None = None,
        *,
        image_tower: ImageTower | None = None,
        text_tower: TextTower | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CLIPStyleConfig()
        generator = torch.Generator().manual_seed(seed)
        self.image_proj = nn.Linear(cfg.d_image, cfg.d_embed, bias=False)
        self.text_proj = nn.Linear(cfg.d_text, cfg.d_embed, bias=False)
        for proj, width in ((self.image_proj, cfg.d_image), (self.text_proj, cfg.d_text)):
            nn.init.normal_(proj.weight, std=width**-0.5, generator=generator)  # CLIP's init
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.register_buffer("image_mean", torch.zeros(cfg.d_image))
        self.register_buffer("image_std", torch.ones(cfg.d_image))
        self.register_buffer("text_mean", torch.zeros(cfg.d_text))
        self.register_buffer("text_std", torch.ones(cfg.d_text))
        self._image_tower = image_tower
        self._text_tower = text_tower
        for tower in (image_tower, text_tower):
            if tower is not None:
                self._check_revision(tower)

    # --- towers -------------------------------------------------------------------------------
    def _check_revision(self, tower: ImageTower | TextTower) -> None:
        kind = "image" if isinstance(tower, ImageTower) else "text"
        expected = getattr(self.cfg, f"{kind}_model_revision")
        if expected is not None and tower.revision != expected:
            raise ValueError(
                f"the {kind} tower's weights (revision {tower.revision[:12]}) differ from those "
                f"the heads were trained on ({expected[:12]}); retrain the heads "
                "(python -m common.models.clip_style train) or load the original tower weights"
            )
        if isinstance(tower, ImageTower) and tower.image_size != self.cfg.image_size:
            raise ValueError(
                f"image tower runs at {tower.image_size} px but the model expects "
                f"{self.cfg.image_size} px; build it with ImageTower(loaded, cfg.image_size)"
            )

    @property
    def image_tower(self) -> ImageTower:
        if self._image_tower is None:
            tower = ImageTower(load_model(self.cfg.image_model), self.cfg.image_size)
            self._check_revision(tower)
            tower.model.to(self.image_proj.weight.device)
            self._image_tower = tower
        return self._image_tower

    @property
    def text_tower(self) -> TextTower:
        if self._text_tower is None:
            tower = TextTower(load_model(self.cfg.text_model), self.cfg.text_max_length)
            self._check_revision(tower)
            tower.model.to(self.text_proj.weight.device)
            self._text_tower = tower
        return self._text_tower

    def _apply(self, fn: Any, recurse: bool = True) -> CLIPStyleModel:
        """``.to(device)`` / ``.float()`` move the loaded towers with the heads."""
        super()._apply(fn, recurse)
        for tower in (self._image_tower, self._text_tower):
            if tower is not None:
                tower.model._apply(fn)
        return self

    # --- heads on precomputed tower features ---------------------------------------------------
    def set_feature_stats(self, image_features: Tensor, text_features: Tensor) -> None:
        """mu, sigma per channel from training features (sigma floored at 1e-3 of its mean)."""
        for prefix, x in (("image", image_features), ("text", text_features)):
            x = x.float()
            std = x.std(0)
            getattr(self, f"{prefix}_mean").copy_(x.mean(0))
            getattr(self, f"{prefix}_std").copy_(std.clamp_min(1e-3 * float(std.mean())))

    def project_image_features(self, pooled: Tensor) -> Tensor:
        """e_I = normalize(W_I (p_I - mu_I) / sigma_I) for pooled tower features (B, 1280)."""
        _check_width(pooled, self.cfg.d_image, "pooled image features")
        z = self.image_proj((pooled.float() - self.image_mean) / self.image_std)
        return F.normalize(z, dim=-1)

    def project_text_features(self, pooled: Tensor) -> Tensor:
        """e_T = normalize(W_T (p_T - mu_T) / sigma_T) for pooled text features (B, 384)."""
        _check_width(pooled, self.cfg.d_text, "pooled text features")
        z = self.text_proj((pooled.float() - self.text_mean) / self.text_std)
        return F.normalize(z, dim=-1)

    def logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """S_ij = exp(t) <e_I_i, e_T_j> with t clamped to ``logit_scale_max`` (CLIP)."""
        scale = self.logit_scale.clamp(max=self.cfg.logit_scale_max).exp()
        return scale * image_emb @ text_emb.T

    # --- end to end -----------------------------------------------------------------------------
    def image_tokens(self, images: Tensor | np.ndarray, batch_size: int = 64) -> ImageTokens:
        """Patch tokens (B, h*w, 1280) of the final feature map (49 at 224 px) and their mean."""
        parts = [
            self.image_tower.tokens(images[i : i + batch_size]) for i in _starts(images, batch_size)
        ]
        return ImageTokens(
            torch.cat([p.patches for p in parts]), torch.cat([p.pooled for p in parts])
        )

    def image_features(self, images: Tensor | np.ndarray, batch_size: int = 64) -> Tensor:
        """Pooled tower features p_I (B, 1280), before the projection head."""
        return self.image_tokens(images, batch_size).pooled

    def encode_image(self, images: Tensor | np.ndarray, batch_size: int = 64) -> Tensor:
        """Projected, L2-normalised image embeddings e_I (B, D)."""
        return self.project_image_features(self.image_features(images, batch_size))

    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Mean-pooled MiniLM features p_T (B, 384), before the projection head."""
        return self.text_tower.features(texts)

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        """Projected, L2-normalised text embeddings e_T (B, D) of any strings."""
        return self.project_text_features(self.text_features(texts))

    def zero_shot_weights(self, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        """Class embeddings (K, D), see ``zero_shot_weights``."""
        return zero_shot_weights(self, class_names, templates)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the heads (``clip_style.safetensors``) and ``config.json``; towers not included."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        (directory / CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        return directory

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        image_tower: ImageTower | None = None,
        text_tower: TextTower | None = None,
    ) -> CLIPStyleModel:
        """Read heads saved by ``save``; towers come from ``load_model`` (or are passed in)."""
        directory = Path(directory)
        weights, config = directory / WEIGHTS_FILE, directory / CONFIG_FILE
        if not weights.is_file() or not config.is_file():
            raise FileNotFoundError(
                f"{directory} lacks {WEIGHTS_FILE} or {CONFIG_FILE}; train a model with "
                f"`python -m common.models.clip_style train --out {directory}`"
            )
        cfg = CLIPStyleConfig.from_dict(json.loads(config.read_text()))
        model = cls(cfg, image_tower=image_tower, text_tower=text_tower)
        model.load_state_dict(load_file(str(weights)), strict=True)
        return model


def _check_width(x: Tensor, d: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != d:
        raise ValueError(f"{what} must have shape (B, {d}), got {tuple(x.shape)}")


def zero_shot_weights(
    encoder: CLIPStyleModel | HubCLIP, class_names: Sequence[str], templates: Sequence[str]
) -> Tensor:
    """CLIP's prompt ensemble: w_c = normalize(mean_k e_T(template_k.format(c))), shape (K, D)."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"templates must be non-empty and each contain '{{}}', got {templates}")
    if not class_names:
        raise ValueError("class_names is empty")
    prompts = [t.format(c) for c in class_names for t in templates]
    emb = encoder.encode_text(prompts).reshape(len(class_names), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)
