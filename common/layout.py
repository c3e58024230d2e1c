"""Where the pipeline's shared outputs live (relative to the repository root).

Each kind of input a paper reads sits under one folder, so that a paper stage depends on exactly
the inputs of its kind (``data/<inputs>``, see ``dvc.yaml``'s ``paper`` pattern):

    data/params_valid.json       the params check's stamp (every stage depends on it)
    data/toy/                    ground-truth toy activations
    data/lm/models/              the converted default LM (SmolLM2, dequantized once)
    data/lm/train/<site>/        activation stores of the LM's training split, one per site
    data/lm/eval/<site>/         ... and of its held-out split
    data/vision/clip_style/      the CLIP-style dual encoder
    data/vision/image_features/  its image tower's pooled features of every image (a cache)
    data/diffusion/unet/         the 16x16 text-to-image diffusion model
    data/diffusion/classifier/   the CNN that scores its samples
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARAMS_VALID = "data/params_valid.json"
INPUT_KINDS = ("toy", "lm", "vision", "diffusion")

TOY_DATA = "data/toy/toy.safetensors"
LM_MODELS = "data/lm/models"
LM_TRAIN = "data/lm/train"
LM_EVAL = "data/lm/eval"
CLIP_STYLE = "data/vision/clip_style"
IMAGE_FEATURES = "data/vision/image_features"
DIFFUSION = "data/diffusion/unet"
CLASSIFIER = "data/diffusion/classifier"

OUTPUTS = "outputs"  # executed notebooks (DVC-cached)
FIGURES = "figures"  # figures and the notebooks' HTML exports (committed)
METRICS = "metrics/papers"  # metrics.json and verdicts.json per paper folder


def lm_store(split: str, site: str) -> str:
    """The activation store of ``site`` for the LM's ``split`` ("train" or "eval")."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    return f"{LM_TRAIN if split == 'train' else LM_EVAL}/{site}"
