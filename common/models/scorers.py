"""What scores generated images: the 16x16 CNN, or CLIP zero-shot for a hub pipeline's images.

The diffusion papers (17, 37) measure edits by how a classifier reads the drawn images: the rate
of the prompted class, the confidence, and a Frechet distance between feature sets. A scorer
answers ``scorer(images)`` (logits, N x K), ``predict`` (argmax) and ``embed`` (features for the
distance), with ``cfg.class_names`` and ``cfg.n_classes``; images are (N, C, S, S) in [0, 1].

* ``ImageClassifier`` (``common.models.classifier``): the 16x16 Fashion-MNIST CNN, trained by
  the ``train_classifier`` stage; ``embed`` is its 128-d penultimate layer.
* ``ZeroShotScorer``: a CLIP read zero-shot (Radford et al., 2021), for Stable Diffusion's
  images, whose concepts no small classifier knows::

      logits_k(x) = s <e_I(x), w_k>,   w_k = normalize(mean_j e_T(template_j(class_k)))

  with e_I, e_T the normalised image and text embeddings and s = exp(logit_scale) the model's
  temperature (100 for OpenAI's CLIP); ``embed`` is e_I (CLIP features, as in FD-CLIP).

``load_scorer(spec, class_names)`` picks one: a folder with the CNN's weights, else any CLIP that
``common.models.clip_style.load_clip`` loads (a hub id, a transformers folder, a CLIP-style run).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from common.models.classifier import WEIGHTS, ImageClassifier, load_classifier
from common.models.clip_style import CLIPStyleModel, HubCLIP, load_clip

ZERO_SHOT_TEMPLATES = ("a photo of a {}.",)


def logit_scale(clip: CLIPStyleModel | HubCLIP) -> float:
    """s = exp(t): CLIP's learned temperature (clamped as the model clamps it in training)."""
    if isinstance(clip, HubCLIP):
        return float(clip.model.logit_scale.exp())
    return float(clip.logit_scale.clamp(max=clip.cfg.logit_scale_max).exp())


class ZeroShotScorer(nn.Module):
    """A CLIP as a K-way classifier of images (module docstring), frozen."""

    def __init__(
        self,
        clip: CLIPStyleModel | HubCLIP,
        class_names: Sequence[str],
        templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
        batch_size: int = 64,
    ) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"zero-shot scoring needs >= 2 class names, got {list(class_names)}")
        self.clip = clip.eval().requires_grad_(False)
        with torch.no_grad():
            self.register_buffer("class_embeddings", clip.zero_shot_weights(class_names, templates))
        self.scale = logit_scale(clip)
        self.batch_size = batch_size
        self.cfg = SimpleNamespace(n_classes=len(class_names), class_names=tuple(class_names))

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """e_I (N, D): normalised CLIP image embeddings of images in [0, 1]."""
        return self.clip.encode_image(images, self.batch_size).float().cpu()

    def forward(self, images: Tensor) -> Tensor:
        return self.scale * self.embed(images) @ self.class_embeddings.float().cpu().T

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        return self(images).argmax(-1)


def load_scorer(
    spec: str | Path,
    class_names: Sequence[str] | None = None,
    *,
    allow_download: bool = False,
    device: str | torch.device = "cpu",
) -> ImageClassifier | ZeroShotScorer:
    """The CNN in folder ``spec``, or a zero-shot scorer over ``class_names`` from CLIP ``spec``
    (its CLIP on ``device``; scores come back on the CPU).

    With the CNN, ``class_names`` (if given) must be its classes, in its order.
    """
    if (Path(spec) / WEIGHTS).is_file():
        clf = load_classifier(spec)
        if class_names is not None and tuple(class_names) != tuple(clf.cfg.class_names):
            raise ValueError(
                f"the classifier in {spec} knows {list(clf.cfg.class_names)}, not "
                f"{list(class_names)}: score a hub pipeline's concepts with a CLIP (e.g. "
                "scorer=openai/clip-vit-base-patch16)"
            )
        return clf
    if not class_names:
        raise ValueError(
            f"{spec} is not a classifier folder ({WEIGHTS}), so it is read as a CLIP for "
            "zero-shot scoring, which needs class_names"
        )
    return ZeroShotScorer(load_clip(spec, allow_download=allow_download).to(device), class_names)
