"""A static HTML feature browser: one self-contained page per SAE and an index (no server, no CDN).

    from common.browser import build_sae_page, build_index, model_logit_tokens, image_latents

``build`` writes the pages, ``logit_lens`` computes the tokens a decoder direction promotes and
suppresses, ``vision`` makes top images with patch heat-maps, ``headless`` drives a headless
Chromium to check and screenshot the pages (tests). ``python -m common.browser --help``: build
pages from saved records.
"""

from common.browser.build import build_index, build_sae_page, scores_from_result, slug
from common.browser.logit_lens import (
    direction_logits,
    final_norm,
    model_logit_tokens,
    top_logit_tokens,
)
from common.browser.vision import ImageLatent, image_latents

__all__ = [
    "ImageLatent",
    "build_index",
    "build_sae_page",
    "direction_logits",
    "final_norm",
    "image_latents",
    "model_logit_tokens",
    "scores_from_result",
    "slug",
    "top_logit_tokens",
]
