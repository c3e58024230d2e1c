"""The CLIP-style run end to end: captions from class names and templates, tower features
(cached), the heads trained contrastively, zero-shot evaluation per dataset (``train_clip_style``).

Training captions come from class names and templates ("a photo of a {}", "a handwritten digit
{}", ...) on Fashion-MNIST and scikit-learn digits. The classes are seen in training (through
captions); the test images and, for ``zero_shot_accuracy_unseen_prompts``, the prompt templates
are not.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.data.images import ImageSet, load_image_set
from common.models.clip_style.contrastive import CaptionedFeatures, fit_heads
from common.models.clip_style.features import DEFAULT_FEATURE_CACHE, cached_image_features
from common.models.clip_style.model import CLIPStyleConfig, CLIPStyleModel
from common.models.clip_style.towers import ImageTower, TextTower
from common.models.loading import load_model

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
