"""Text conditioning of the U-Net: captions -> cross-attention tokens (``TextConditioner``).

The 16x16 model reads all-MiniLM-L6-v2 token embeddings c in R^{T x 384} (last hidden state,
padded to ``max_tokens`` with an attention mask), cached per caption (``CaptionEncoder``). The
empty caption "" is the unconditional input of classifier-free guidance, as in Stable Diffusion.
A hub pipeline's CLIP text encoders answer the same protocol (``hub.HubCaptionEncoder``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
from torch import Tensor

from common.models.loading import LoadedModel, load_model

CAPTION_TEMPLATES = (
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a {} on a plain background",
)
TEXT_ENCODER = "minilm-l6"


def check_captions(captions: Sequence[str]) -> None:
    """Raise a TypeError unless ``captions`` is a list of strings (not one bare string)."""
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise TypeError(f"captions must be a list of strings, got {captions!r}")


class TextConditioner(Protocol):
    """What the U-Net is conditioned on, per caption: ``CaptionEncoder`` (MiniLM, the 16x16
    model) or ``hub.HubCaptionEncoder`` (a Stable Diffusion pipeline's CLIP encoders).

    ``__call__`` gives the cross-attention input (N, T, d) and its mask (N, T);
    ``added_conditioning`` the U-Net's extra inputs (SDXL's ``text_embeds``, ``time_ids``) or None.
    """

    max_tokens: int

    @property
    def revision(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]: ...

    def added_conditioning(self, captions: Sequence[str]) -> dict[str, Tensor] | None: ...


class CaptionEncoder:
    """Captions -> MiniLM token embeddings c (T x 384, last hidden state) and attention mask m.

    Every caption is padded to ``max_tokens`` tokens ([CLS] ... [SEP] [PAD]...); m marks the real
    tokens, and cross-attention ignores the padding. Embeddings are computed once per caption and
    cached. MiniLM is loaded on first use unless ``text_model`` is given.
    """

    def __init__(self, text_model: LoadedModel | None = None, max_tokens: int = 16) -> None:
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 ([CLS] and [SEP]), got {max_tokens}")
        self._text_model = text_model
        self.max_tokens = max_tokens
        self._cache: dict[str, tuple[Tensor, Tensor]] = {}

    @property
    def text_model(self) -> LoadedModel:
        if self._text_model is None:
            self._text_model = load_model(TEXT_ENCODER)
        return self._text_model

    @property
    def revision(self) -> str:
        return self.text_model.revision

    @property
    def dim(self) -> int:
        return int(self.text_model.model.config.hidden_size)

    @torch.no_grad()
    def __call__(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """(len(captions), max_tokens, 384) embeddings and a (len(captions), max_tokens) mask."""
        check_captions(captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            tokenizer, model = self.text_model.tokenizer, self.text_model.model
            lengths = [len(ids) for ids in tokenizer(missing)["input_ids"]]
            too_long = [c for c, n in zip(missing, lengths) if n > self.max_tokens]
            if too_long:
                raise ValueError(
                    f"captions longer than max_tokens={self.max_tokens} tokens: {too_long}; "
                    "shorten them or build the model with a larger max_tokens"
                )
            batch = tokenizer(
                missing, padding="max_length", max_length=self.max_tokens, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state.float()
            for i, caption in enumerate(missing):
                self._cache[caption] = (hidden[i].clone(), batch["attention_mask"][i].float())
        emb = torch.stack([self._cache[c][0] for c in captions])
        mask = torch.stack([self._cache[c][1] for c in captions])
        return emb, mask

    def added_conditioning(self, captions: Sequence[str]) -> dict[str, Tensor] | None:
        """Extra U-Net inputs per caption (SDXL's pooled text and size ids); none here."""
        return None
