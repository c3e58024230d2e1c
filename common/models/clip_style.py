"""A CLIP-style dual encoder built offline from two real frozen towers and trained projection heads.

No CLIP ships offline, so the default profile builds one (Radford et al., 2021, the model behind
papers 3, 14, 18, 21, 28, 46):

    image tower  f_I(x) : EfficientNet-Lite0 (ImageNet), final 1280 x h x w feature map
                          (h = w = 7 at 224 px: 49 "patch" tokens); pooled p_I = mean over positions
    text tower   f_T(s) : all-MiniLM-L6-v2, p_T = mean of the last hidden states over real tokens
    heads        e_I = normalize(W_I (p_I - mu_I) / sigma_I),  W_I: 1280 -> D
                 e_T = normalize(W_T (p_T - mu_T) / sigma_T),  W_T:  384 -> D   (D = 256)
    similarity   s_ij = exp(t) <e_I_i, e_T_j>,  t learnable, t_0 = log(1 / 0.07), t <= log(100)
    loss         symmetric InfoNCE, L = (CE(S, Y) + CE(S^T, Y^T)) / 2  (CLIP's eq., see
                 ``info_nce``); the towers stay frozen, only W_I, W_T and t are trained.

mu and sigma are fixed per-channel statistics of the training features (standardisation, stored
with the heads). Training captions come from class names and templates ("a photo of a {}", "a
handwritten digit {}", ...) on Fashion-MNIST and scikit-learn digits; tower features are computed
once and cached as safetensors, so training the heads takes seconds. Zero-shot classification is
CLIP's: the class embedding is the normalised mean of e_T over the prompt templates, the prediction
argmax_c <e_I, e_c>. The classes are seen in training (through captions); the test images and, for
``zero_shot_accuracy_unseen_prompts``, the prompt templates are not. It does not transfer to classes
absent from training: with 2 classes per dataset held out of the captions, their images were never
assigned to them (0 of 10-way, 224 px, 2000 images per dataset). Papers that need open-vocabulary
behaviour (SpLiCE's concept vocabulary, paper 3) should say so, or run the hub profile.

API used by the CLIP papers; ``HubCLIP`` gives a real transformers CLIP the same methods, and
``load_clip(spec)`` picks one from the pipeline's parameter (a run folder or a hub name):

    model = load_clip("data/vision/clip_style")  # CLIPStyleModel; the towers load on first use
    model.image_tokens(images)   # ImageTokens(patches (B, 49, 1280), pooled (B, 1280))
    model.image_features(images) # pooled tower features (B, 1280)
    model.encode_image(images)   # projected, normalised (B, D)
    model.encode_text(strings)   # projected, normalised (B, D)
    model.zero_shot_weights(class_names, templates)  # (K, D)

Images: uint8 in [0, 255] or float in [0, 1]; shapes (B, H, W), (B, 1, H, W) or (B, 3, H, W); grey
images are replicated to 3 channels, everything is resized (bilinear, antialiased) to
``image_size``. Command line (writes the heads, config.json and a metrics JSON):

    python -m common.models.clip_style train --out data/vision/clip_style --n-train 2000 \\
        --n-test 1000 --epochs 30 --seed 0 --metrics metrics/clip_style.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.data.images import ImageSet, load_image_set
from common.hooks import tokens_from
from common.models.loading import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    LoadedModel,
    _clip_preprocess,
    _normalizer,
    load_model,
)

WEIGHTS_FILE = "clip_style.safetensors"
CONFIG_FILE = "config.json"
ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_FEATURE_CACHE = ROOT / "data" / "clip_style_features"

# Training captions: every template x every class name of the dataset.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "a photo of a {}.",
        "a black and white photo of a {}.",
        "a low resolution photo of a {}.",
        "a grayscale product photo of a {}.",
        "a photo of a {}, a type of clothing.",
        "a blurry picture of the {}.",
    ),
    "digits": (
        "a photo of the digit {}.",
        "a handwritten digit {}.",
        "a black and white photo of the number {}.",
        "a low resolution image of a handwritten {}.",
        "the number {}, written by hand.",
        "a blurry picture of the digit {}.",
    ),
}
# Held-out templates: never seen in training, used only for ``accuracy_unseen_prompts``.
UNSEEN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("an image of a {}.", "a cropped photo of the {}.", "a small photo of a {}."),
    "digits": ("an image of the number {}.", "a scan of a {} written by hand.", "digit {}."),
}


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


def _starts(images: Tensor | np.ndarray, batch_size: int) -> range:
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return range(0, max(len(images), 1), batch_size)


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


class HubCLIP(nn.Module):
    """A real CLIP (transformers ``CLIPModel``) behind the same API as ``CLIPStyleModel``.

    patches = last-layer ViT tokens without CLS (B, (S/p)^2, d); pooled = post-LayerNorm CLS;
    e_I = normalize(W_v pooled), e_T = normalize(W_t pooled text) (Radford et al., 2021). Pixels:
    resize to the model's ``image_size`` and normalise with its processor's mean/std.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        name: str,
        revision: str = "",
        preprocess: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name, self.revision = name, revision
        self.image_size = int(model.config.vision_config.image_size)
        self.d_embed = int(model.config.projection_dim)
        self.preprocess = preprocess or _normalizer(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
        d_image = int(model.config.vision_config.hidden_size)
        self.cfg = SimpleNamespace(
            name=name, image_size=self.image_size, d_embed=self.d_embed, d_image=d_image
        )
        # The CLIP-style head's form e = normalize(W (p - mu) / sigma), with mu = 0 and sigma = 1.
        self.register_buffer("image_mean", torch.zeros(d_image), persistent=False)
        self.register_buffer("image_std", torch.ones(d_image), persistent=False)

    @property
    def image_proj(self) -> nn.Linear:
        return self.model.visual_projection

    @property
    def image_tower(self) -> HubCLIP:
        """The model itself answers the image tower's API (tokens, image_size, revision)."""
        return self

    def tokens(self, images: Tensor | np.ndarray) -> ImageTokens:
        return self.image_tokens(images)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, allow_download: bool = False) -> HubCLIP:
        """``CLIPModel`` + tokenizer from a folder or the local Hugging Face cache (hub names)."""
        from transformers import AutoTokenizer, CLIPModel

        local_only = not allow_download and not Path(name_or_path).is_dir()
        try:
            model = CLIPModel.from_pretrained(
                name_or_path, dtype=torch.float32, local_files_only=local_only
            )
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_only)
        except OSError as err:
            raise OSError(
                f"CLIP {name_or_path!r} is neither a folder nor in the local Hugging Face cache; "
                f"download it once with `huggingface-cli download {name_or_path}` on a machine "
                "with internet, or pass allow_download=True"
            ) from err
        revision = getattr(model.config, "_commit_hash", None) or "local"
        preprocess = _clip_preprocess(name_or_path, local_only)
        return cls(model, tokenizer, name_or_path, revision, preprocess)

    def _pixels(self, images: Tensor | np.ndarray) -> Tensor:
        device = self.model.visual_projection.weight.device
        return self.preprocess(to_pixels(images, self.image_size).to(device))

    def image_tokens(self, images: Tensor | np.ndarray, batch_size: int = 64) -> ImageTokens:
        """Last-layer patch tokens (B, P, d) and the pooled (post-LayerNorm) CLS token (B, d)."""
        patches, pooled = [], []
        for i in _starts(images, batch_size):
            out = self.model.vision_model(pixel_values=self._pixels(images[i : i + batch_size]))
            patches.append(out.last_hidden_state[:, 1:])
            pooled.append(out.pooler_output)
        return ImageTokens(torch.cat(patches), torch.cat(pooled))

    def image_features(self, images: Tensor | np.ndarray, batch_size: int = 64) -> Tensor:
        return self.image_tokens(images, batch_size).pooled

    def encode_image(self, images: Tensor | np.ndarray, batch_size: int = 64) -> Tensor:
        return self.project_image_features(self.image_features(images, batch_size))

    def project_image_features(self, pooled: Tensor) -> Tensor:
        """e_I = normalize(W_I p_I): CLIP's visual projection of pooled features."""
        weight = self.model.visual_projection.weight
        return F.normalize(self.model.visual_projection(pooled.to(weight)), dim=-1)

    def project_text_features(self, pooled: Tensor) -> Tensor:
        """e_T = normalize(W_T p_T): CLIP's text projection of pooled text features."""
        weight = self.model.text_projection.weight
        return F.normalize(self.model.text_projection(pooled.to(weight)), dim=-1)

    def text_features(self, texts: Sequence[str]) -> Tensor:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a list of strings (wrap a single string in a list)")
        device = self.model.text_projection.weight.device
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(device)
        out = self.model.text_model(
            input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        )
        return out.pooler_output

    def encode_text(self, texts: Sequence[str]) -> Tensor:
        return self.project_text_features(self.text_features(texts))

    def zero_shot_weights(self, class_names: Sequence[str], templates: Sequence[str]) -> Tensor:
        return zero_shot_weights(self, class_names, templates)


def load_clip(spec: str | Path, *, allow_download: bool = False) -> CLIPStyleModel | HubCLIP:
    """The CLIP the pipeline's ``clip`` parameter names: a trained CLIP-style run folder (default
    profile, e.g. ``data/vision/clip_style``) or a hub CLIP (``openai/clip-vit-base-patch16``,
    GPU/hub profile). Both answer image_tokens / image_features / encode_image / encode_text."""
    path = Path(spec)
    if (path / WEIGHTS_FILE).is_file():
        return CLIPStyleModel.load(path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} holds neither {WEIGHTS_FILE} (a CLIP-style run) nor a transformers CLIP; "
            f"train one with `python -m common.models.clip_style train --out {path}`"
        )
    return HubCLIP.from_pretrained(str(spec), allow_download=allow_download)


def info_nce(
    image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, groups: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE of CLIP: L = (CE(S, Y) + CE(S^T, Y^T)) / 2, S_ij = exp(t) <e_I_i, e_T_j>.

    Without ``groups`` Y = I (pair i is the only positive of row i), CLIP's loss. With ``groups``
    (the caption's class) every pair of the same group is a positive:
    Y_ij = 1[g_i = g_j] / sum_k 1[g_i = g_k]; captions built from class names repeat within a
    batch, and calling identical captions negatives would ask for the impossible. Y is symmetric,
    so both directions use the same target; with all groups distinct it reduces to Y = I.
    """
    scale = logit_scale.exp() if isinstance(logit_scale, Tensor) else math.exp(logit_scale)
    logits = scale * image_emb @ text_emb.T
    if groups is None:
        targets = torch.arange(len(logits), device=logits.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    same = (groups[:, None] == groups[None, :]).to(logits.dtype)
    y = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))


# --- captioned features ---------------------------------------------------------------------------
@dataclass
class CaptionedFeatures:
    """Pooled image features with their caption group and every caption's text features.

    ``groups[i]`` indexes ``group_names``; image i is paired, each epoch, with one of its group's
    captions drawn uniformly: ``caption_features[groups[i], k]`` for a random template k.
    """

    image_features: Tensor  # (N, 1280)
    groups: Tensor  # (N,) int64
    caption_features: Tensor  # (G, n_templates, 384)
    group_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.image_features) != len(self.groups):
            raise ValueError(
                f"{len(self.image_features)} image features but {len(self.groups)} groups"
            )
        if len(self.groups) and int(self.groups.max()) >= len(self.caption_features):
            raise ValueError("a group index exceeds the number of caption groups")


def fit_heads(
    model: CLIPStyleModel,
    data: CaptionedFeatures,
    *,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    num_threads: int | None = 1,
    progress: bool = False,
) -> list[float]:
    """Train W_I, W_T and t with ``info_nce`` (AdamW, cosine decay); return the loss per epoch.

    Sets the feature statistics mu, sigma from ``data`` first. Deterministic given ``seed``.
    ``num_threads``: torch threads during training (restored after; ``None`` leaves them). The
    heads are small matrices; on a shared 2-core CPU one thread ran 6x faster than two.
    """
    previous = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _fit_heads(model, data, epochs, batch_size, lr, weight_decay, seed, progress)
    finally:
        torch.set_num_threads(previous)


def _fit_heads(
    model: CLIPStyleModel,
    data: CaptionedFeatures,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool,
) -> list[float]:
    if epochs <= 0 or batch_size <= 1:
        raise ValueError(f"need epochs >= 1 and batch_size >= 2, got {epochs}, {batch_size}")
    n = len(data.groups)
    if n < 2:
        raise ValueError(f"need at least 2 training images, got {n}")
    g = torch.Generator().manual_seed(seed)
    device = model.image_proj.weight.device
    all_captions = data.caption_features.flatten(0, 1)
    model.set_feature_stats(data.image_features.to(device), all_captions.to(device))
    x_all, groups = data.image_features.to(device), data.groups.to(device)
    captions = data.caption_features.to(device)
    n_templates = captions.shape[1]
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(
        [
            {
                "params": [model.image_proj.weight, model.text_proj.weight],
                "weight_decay": weight_decay,
            },
            {"params": [model.logit_scale], "weight_decay": 0.0},
        ],
        lr=lr,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    history = []
    model.train()
    for _ in tqdm(range(epochs), desc="clip-style heads", disable=not progress):
        perm = torch.randperm(n, generator=g).to(device)
        template = torch.randint(n_templates, (n,), generator=g).to(device)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            if len(idx) < 2:
                continue
            text_x = captions[groups[idx], template[idx]]
            e_i = model.project_image_features(x_all[idx])
            e_t = model.project_text_features(text_x)
            scale = model.logit_scale.clamp(max=model.cfg.logit_scale_max)
            loss = info_nce(e_i, e_t, scale, groups[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        history.append(total / seen)
    model.eval()
    return history


# --- feature cache --------------------------------------------------------------------------------
def cached_image_features(
    tower: ImageTower,
    images: ImageSet,
    cache_dir: str | Path | None,
    tag: str,
    *,
    batch_size: int = 64,
    chunk: int = 512,
    progress: bool = True,
    write: bool = True,
) -> tuple[Tensor, float, int]:
    """Pooled tower features of ``images`` (N, 1280); returns (features, seconds, n_computed).

    With ``cache_dir`` the features are written as safetensors in chunks of ``chunk`` images under
    ``cache_dir/<tag>/``, each named by a hash of (tower revision, image size, the chunk's pixels):
    a changed subset, size or weight file never reuses stale features, an interrupted run resumes
    from the last finished chunk, and a larger seeded subset (``ImageSet.subset`` keeps the prefix)
    reuses the chunks of a smaller one. ``write=False`` reads the cache but never adds to it (for
    readers of a cache that is another pipeline stage's output).
    """
    n = len(images)
    folder = Path(cache_dir) / tag if cache_dir is not None else None
    parts, seconds, computed = [], 0.0, 0
    bar = tqdm(total=n, desc=f"features {tag}", unit="img", disable=not progress)
    for start in range(0, n, chunk):
        block = images.images[start : start + chunk]
        path = None
        if folder is not None:
            h = hashlib.sha256(f"{tower.revision}|{tower.image_size}|".encode())
            h.update(block.numpy().tobytes())
            path = folder / f"{start:07d}-{len(block)}-{h.hexdigest()[:16]}.safetensors"
        if path is not None and path.is_file():
            part = load_file(str(path))["pooled"]
            bar.update(len(part))
        else:
            t0 = time.perf_counter()
            pieces = []
            with torch.inference_mode():
                for i in range(0, len(block), batch_size):
                    pieces.append(tower.tokens(block[i : i + batch_size]).pooled.cpu())
                    bar.update(len(pieces[-1]))
            part = torch.cat(pieces)
            seconds += time.perf_counter() - t0
            computed += len(part)
            if path is not None and write:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                save_file({"pooled": part.contiguous()}, str(tmp), metadata={"tag": tag})
                tmp.replace(path)
        parts.append(part)
    bar.close()
    return torch.cat(parts).float(), seconds, computed


def shared_image_features(
    dataset: str,
    split: str,
    n: int,
    seed: int = 0,
    *,
    cache_dir: str | Path = "data/vision/image_features",
    image_size: int | None = None,
    clip_dir: str | Path = "data/vision/clip_style",
    tower: ImageTower | None = None,
    progress: bool = True,
) -> tuple[Tensor, ImageSet]:
    """Pooled EfficientNet-Lite0 features (N, 1280) of a seeded subset, and the subset itself.

    Reads the feature cache that the ``train_clip_style`` stage writes
    (``data/vision/image_features``:
    ``clip_style.n_train`` / ``n_test`` images per dataset, ``seed``), so vision papers do not
    re-run the image tower on the same images. A subset with the same seed and ``n`` no larger than
    the stage's reuses its full chunks; anything missing is computed (and not written back).
    ``image_size`` defaults to the one the CLIP-style run in ``clip_dir`` was trained at (224 px
    without such a run), so a profile that changes ``clip_style.image_size`` changes it here too.
    A hub CLIP name as ``clip_dir`` (e.g. ``openai/clip-vit-base-patch16``, already in the local
    Hugging Face cache) gives that model's pooled image features instead.
    """
    images = load_image_set(dataset, split).subset(n, seed)
    config_path = Path(clip_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    is_clip_style = "image_model" in config
    if tower is None and not is_clip_style and (config or not Path(clip_dir).exists()):
        # a hub CLIP (GPU/hub profile): its own pooled features, no shared cache
        with torch.inference_mode():
            return load_clip(str(clip_dir)).image_features(images.images).float(), images
    if image_size is None:
        image_size = int(config["image_size"]) if is_clip_style else 224
    tower = tower or ImageTower(load_model("efficientnet-lite0"), image_size)
    feats, _, _ = cached_image_features(
        tower,
        images,
        cache_dir,
        f"{dataset}-{split}-{image_size}px",
        progress=progress,
        write=False,
    )
    return feats, images


def caption_groups(
    sets: Sequence[ImageSet], templates: dict[str, Sequence[str]] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Group names ``"<dataset>/<class>"`` and, per group, its captions (template x class name)."""
    templates = templates or TEMPLATES
    names, captions = [], []
    for s in sets:
        if s.name not in templates:
            raise ValueError(f"no caption templates for {s.name!r}; known: {sorted(templates)}")
        for c in s.class_names:
            names.append(f"{s.name}/{c}")
            captions.append([t.format(c) for t in templates[s.name]])
    return names, captions


# --- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def zero_shot_accuracy(
    model: CLIPStyleModel,
    image_features: Tensor,
    labels: Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
) -> float:
    """Accuracy of argmax_c <e_I, w_c> over the dataset's classes (CLIP's zero-shot protocol)."""
    weights = model.zero_shot_weights(class_names, templates)
    emb = model.project_image_features(image_features.to(weights.device))
    pred = (emb @ weights.T).argmax(1).cpu()
    return float((pred == labels).float().mean())


def linear_probe_accuracy(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, seed: int = 0
) -> float:
    """Reference: multinomial logistic regression on standardised pooled tower features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.1, max_iter=500, random_state=seed)
    )
    clf.fit(train_x.numpy(), train_y.numpy())
    return float(clf.score(test_x.numpy(), test_y.numpy()))


# --- end-to-end training --------------------------------------------------------------------------
def train_clip_style(
    *,
    datasets: Sequence[str] = ("fashion-mnist", "digits"),
    n_train: int = 2000,
    n_test: int = 1000,
    d_embed: int = 256,
    image_size: int = 224,
    epochs: int = 30,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = DEFAULT_FEATURE_CACHE,
    out: str | Path | None = None,
    linear_probe: bool = True,
    image_tower: ImageTower | None = None,
    text_tower: TextTower | None = None,
    progress: bool = True,
) -> tuple[CLIPStyleModel, dict[str, Any]]:
    """Extract (or reuse cached) tower features, train the heads, evaluate zero-shot per dataset.

    ``n_train`` / ``n_test``: images per dataset (seeded subsets; capped at the split's size:
    digits has 1438 train / 359 test images). Returns the model and a metrics dict; with ``out``
    the heads are saved there. The defaults (224 px, 2000 + 1000 images per dataset) cost about
    8 minutes of feature extraction on a shared 2-core CPU, once; the heads train in seconds.
    """
    start_time = time.perf_counter()
    if n_train < 10 or n_test < 1:
        raise ValueError(f"need n_train >= 10 and n_test >= 1, got {n_train}, {n_test}")
    text_tower = text_tower or TextTower(load_model("minilm-l6"))
    image_tower = image_tower or ImageTower(load_model("efficientnet-lite0"), image_size)
    if image_tower.image_size != image_size:
        raise ValueError(f"image_tower runs at {image_tower.image_size} px, not {image_size}")
    cfg = CLIPStyleConfig(
        d_embed=d_embed,
        image_size=image_size,
        image_model=image_tower.loaded.name,
        text_model=text_tower.loaded.name,
        image_model_revision=image_tower.revision,
        text_model_revision=text_tower.revision,
    )
    model = CLIPStyleModel(cfg, image_tower=image_tower, text_tower=text_tower, seed=seed)

    train_sets = [load_image_set(d, "train").subset(n_train, seed) for d in datasets]
    test_sets = [load_image_set(d, "test").subset(n_test, seed) for d in datasets]
    feats: dict[str, tuple[Tensor, Tensor]] = {}
    extract_seconds, n_extracted = 0.0, 0
    for split, sets in (("train", train_sets), ("test", test_sets)):
        for s in sets:
            x, sec, k = cached_image_features(
                image_tower, s, cache_dir, f"{s.name}-{split}-{image_size}px", progress=progress
            )
            feats[f"{s.name}/{split}"] = (x, s.labels)
            extract_seconds, n_extracted = extract_seconds + sec, n_extracted + k

    names, captions = caption_groups(train_sets)
    with torch.inference_mode():
        flat = text_tower.features([c for group in captions for c in group])
    offsets = np.cumsum([0] + [len(s.class_names) for s in train_sets])
    data = CaptionedFeatures(
        image_features=torch.cat([feats[f"{s.name}/train"][0] for s in train_sets]),
        groups=torch.cat(
            [feats[f"{s.name}/train"][1] + int(o) for s, o in zip(train_sets, offsets)]
        ),
        caption_features=flat.reshape(len(names), len(captions[0]), -1).clone(),
        group_names=names,
    )
    t0 = time.perf_counter()
    history = fit_heads(
        model,
        data,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        seed=seed,
        progress=progress,
    )
    train_seconds = time.perf_counter() - t0

    per_dataset = {}
    for s in test_sets:
        x, y = feats[f"{s.name}/test"]
        entry = {
            "zero_shot_accuracy": zero_shot_accuracy(model, x, y, s.class_names, TEMPLATES[s.name]),
            "zero_shot_accuracy_unseen_prompts": zero_shot_accuracy(
                model, x, y, s.class_names, UNSEEN_TEMPLATES[s.name]
            ),
            "chance": 1.0 / len(s.class_names),
            "n_train": len(feats[f"{s.name}/train"][1]),
            "n_test": len(y),
        }
        if linear_probe:
            tx, ty = feats[f"{s.name}/train"]
            entry["linear_probe_accuracy"] = linear_probe_accuracy(tx, ty, x, y, seed)
        per_dataset[s.name] = entry
    with torch.no_grad():
        map_side = image_tower.tokens(train_sets[0].images[:1]).patches.shape[1]
    metrics = {
        "datasets": per_dataset,
        "train": {
            "loss_first_epoch": history[0],
            "loss_last_epoch": history[-1],
            "loss_per_epoch": history,
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "n_images": len(data.groups),
            "seconds": round(train_seconds, 2),
            "logit_scale": float(model.logit_scale.detach().exp()),
        },
        "features": {
            "image_size": image_size,
            "patch_tokens_per_image": map_side,
            "n_images_computed": n_extracted,
            "seconds": round(extract_seconds, 2),
            "seconds_per_1000_images": (
                round(1000 * extract_seconds / n_extracted, 1) if n_extracted else None
            ),
            "torch_threads": torch.get_num_threads(),
        },
        "config": cfg.to_dict(),
        "seed": seed,
        "seconds_total": round(time.perf_counter() - start_time, 2),
    }
    if out is not None:
        model.save(out)
    return model, metrics


# --- command line ---------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m common.models.clip_style",
        description="Train the CLIP-style heads over frozen EfficientNet-Lite0 + MiniLM towers.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="extract features (cached), train heads, zero-shot eval")
    t.add_argument("--out", required=True, help="folder for clip_style.safetensors + config.json")
    t.add_argument(
        "--metrics", default=None, help="metrics JSON path (default: <out>/metrics.json)"
    )
    t.add_argument("--datasets", default="fashion-mnist,digits", help="comma-separated")
    t.add_argument("--n-train", type=int, default=2000, help="train images per dataset")
    t.add_argument("--n-test", type=int, default=1000, help="test images per dataset")
    t.add_argument("--d-embed", type=int, default=256)
    t.add_argument("--image-size", type=int, default=224, help="224 px -> 7x7 = 49 patch tokens")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache-dir", default=str(DEFAULT_FEATURE_CACHE), help="'' disables the cache")
    t.add_argument("--no-linear-probe", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not datasets:
        raise SystemExit("--datasets is empty; e.g. --datasets fashion-mnist,digits")
    unknown = [d for d in datasets if d not in TEMPLATES]
    if unknown:
        raise SystemExit(
            f"--datasets: no caption templates for {unknown}; known: {sorted(TEMPLATES)}"
        )
    try:
        CLIPStyleConfig(d_embed=args.d_embed, image_size=args.image_size)
        _, metrics = train_clip_style(
            datasets=datasets,
            n_train=args.n_train,
            n_test=args.n_test,
            d_embed=args.d_embed,
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            cache_dir=args.cache_dir or None,
            out=args.out,
            linear_probe=not args.no_linear_probe,
            progress=not args.no_progress,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    path = Path(args.metrics) if args.metrics else Path(args.out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    summary = {
        name: {k: round(v, 4) for k, v in d.items() if "accuracy" in k}
        for name, d in metrics["datasets"].items()
    }
    print(json.dumps(summary), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
