"""A real CLIP from the hub behind the CLIP-style model's API (``HubCLIP``), and ``load_clip``,
which picks one of the two from the pipeline's ``clip`` parameter."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.models.clip_style.model import WEIGHTS_FILE, CLIPStyleModel, zero_shot_weights
from common.models.clip_style.towers import ImageTokens, _starts, to_pixels
from common.models.loading import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _clip_preprocess, _normalizer


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
