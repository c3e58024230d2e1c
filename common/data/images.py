"""Labelled image sets that ship offline: Fashion-MNIST (Debian) and scikit-learn's digits.

Each loader returns an ``ImageSet``: uint8 images ``(N, H, W)`` in [0, 255], integer labels and the
class names, with the standard train/test split (Fashion-MNIST) or a seeded one (digits).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass
class ImageSet:
    images: Tensor  # (N, H, W) uint8
    labels: Tensor  # (N,) int64
    class_names: tuple[str, ...]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> ImageSet:
        """A seeded random subset of ``n`` images (all of them if ``n >= len``)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ImageSet(self.images[idx], self.labels[idx], self.class_names, self.name)


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, dimensions, then raw uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    n_dims = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(n_dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * n_dims).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | Path = FASHION_MNIST_DIR) -> ImageSet:
    """Fashion-MNIST: 60k train / 10k test 28x28 grey images of 10 clothing classes."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.exists() or not labels_path.exists():
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {root}. Install Debian's package: "
            "`sudo apt-get install dataset-fashion-mnist` (scripts/setup.sh does this)."
        )
    images = torch.from_numpy(_read_idx(images_path).copy())
    labels = torch.from_numpy(_read_idx(labels_path).astype(np.int64))
    return ImageSet(images, labels, FASHION_MNIST_CLASSES, "fashion-mnist")


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ImageSet:
    """scikit-learn's 1797 8x8 handwritten digits, rescaled from 0..16 to 0..255, seeded split."""
    from sklearn.datasets import load_digits as sk_load_digits

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    digits = sk_load_digits()
    images = torch.from_numpy((digits.images * (255 / 16)).round().astype(np.uint8))
    labels = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(labels)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return ImageSet(images[idx], labels[idx], DIGIT_CLASSES, "digits")


IMAGE_SETS = {"fashion-mnist": load_fashion_mnist, "digits": load_digits}


def load_image_set(name: str, split: str = "train") -> ImageSet:
    if name not in IMAGE_SETS:
        raise ValueError(f"unknown image set {name!r}; valid: {sorted(IMAGE_SETS)}")
    return IMAGE_SETS[name](split)


def resize(images: Tensor, size: int) -> Tensor:
    """uint8 (N, H, W) -> float (N, 1, size, size) in [0, 1], bilinear (antialiased)."""
    x = images.float().div(255).unsqueeze(1)
    return torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
