"""The image tower's pooled features of a seeded image subset, cached on disk.

``cached_image_features`` computes (or reads) them in hashed chunks; ``shared_image_features``
reads the cache the ``train_clip_style`` stage writes (``data/vision/image_features``), so the
vision papers do not re-run the tower on the same images.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from common import layout
from common.data.images import ImageSet, load_image_set
from common.layout import ROOT
from common.models.clip_style.hub import load_clip
from common.models.clip_style.towers import ImageTower
from common.models.loading import load_model

DEFAULT_FEATURE_CACHE = ROOT / "data" / "clip_style_features"


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
    cache_dir: str | Path = layout.ROOT / layout.IMAGE_FEATURES,
    image_size: int | None = None,
    clip_dir: str | Path = layout.ROOT / layout.CLIP_STYLE,
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
