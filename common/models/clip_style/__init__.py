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

Modules, one job each: ``towers`` (the frozen towers, ``to_pixels``), ``model`` (the heads,
``CLIPStyleModel``, save / load, zero-shot weights), ``hub`` (``HubCLIP``, ``load_clip``),
``features`` (the cached pooled features, ``shared_image_features``), ``contrastive``
(``info_nce``, ``fit_heads``), ``training`` (``train_clip_style``: data, captions, evaluation),
``cli``.
"""

from common.models.clip_style.cli import main
from common.models.clip_style.contrastive import CaptionedFeatures, fit_heads, info_nce
from common.models.clip_style.features import (
    DEFAULT_FEATURE_CACHE,
    cached_image_features,
    shared_image_features,
)
from common.models.clip_style.hub import HubCLIP, load_clip
from common.models.clip_style.model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CLIPStyleConfig,
    CLIPStyleModel,
    zero_shot_weights,
)
from common.models.clip_style.towers import ImageTokens, ImageTower, TextTower, to_pixels
from common.models.clip_style.training import (
    TEMPLATES,
    UNSEEN_TEMPLATES,
    caption_groups,
    linear_probe_accuracy,
    train_clip_style,
    zero_shot_accuracy,
)

__all__ = [
    "CONFIG_FILE",
    "DEFAULT_FEATURE_CACHE",
    "TEMPLATES",
    "UNSEEN_TEMPLATES",
    "WEIGHTS_FILE",
    "CLIPStyleConfig",
    "CLIPStyleModel",
    "CaptionedFeatures",
    "HubCLIP",
    "ImageTokens",
    "ImageTower",
    "TextTower",
    "cached_image_features",
    "caption_groups",
    "fit_heads",
    "info_nce",
    "linear_probe_accuracy",
    "load_clip",
    "main",
    "shared_image_features",
    "to_pixels",
    "train_clip_style",
    "zero_shot_accuracy",
    "zero_shot_weights",
]
