"""A small CNN that classifies 16x16 Fashion-MNIST, to score what the diffusion model draws.

The class-conditional accuracy of generated samples (papers 17 and 37's stand-in for CLIP or
human judgement) is the rate at which this classifier assigns the prompted class::

    acc = (1/N) sum_i [argmax_k f(x_i)_k == y_i]      (x_i drawn from the caption of class y_i)

Architecture: conv3x3(1->w) ReLU conv3x3(w->2w) ReLU maxpool2 conv3x3(2w->4w) ReLU maxpool2,
then linear(4w (S/4)^2 -> 128) ReLU linear(128 -> classes). Inputs are images in [0, 1],
standardised inside the model with the Fashion-MNIST mean and standard deviation.

Command line::

    python -m common.models.classifier train --out data/diffusion/classifier --epochs 3 --seed 0 \
        --metrics metrics/classifier.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.286, 0.353
WEIGHTS, CONFIG = "classifier.safetensors", "config.json"


@dataclass(frozen=True)
class ClassifierConfig:
    n_classes: int = 10
    image_size: int = 16
    width: int = 16
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {self.image_size}")
        if self.class_names and len(self.class_names) != self.n_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.n_classes} classes")


class ImageClassifier(nn.Module):
    """The CNN of the module docstring: logits f(x) for images x (B, 1, S, S) in [0, 1]."""

    def __init__(self, cfg: ClassifierConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, s = cfg.width, cfg.image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(4 * w * (s // 4) ** 2, 128),
            nn.ReLU(),
            nn.Linear(128, cfg.n_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        s = self.cfg.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, s, s):
            raise ValueError(f"expected images (B, 1, {s}, {s}) in [0, 1], got {tuple(x.shape)}")
        return self.head(self.features((x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD))

    @torch.no_grad()
    def embed(self, x: Tensor) -> Tensor:
        """Penultimate features (B, 128), post-ReLU: the space of the Frechet distance."""
        self.eval()
        return self.head[:-1](self.features((x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD))

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 1024) -> Tensor:
        """argmax_k f(x)_k for every image, in eval mode."""
        self.eval()
        return torch.cat(
            [self(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)]
        )

    def save(self, folder: str | Path, metrics: dict[str, Any] | None = None) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))
        card = {"config": asdict(self.cfg), "metrics": metrics or {}}
        (folder / CONFIG).write_text(json.dumps(card, indent=1) + "\n")


def load_classifier(folder: str | Path) -> ImageClassifier:
    """Load a folder written by ``ImageClassifier.save`` (safetensors), in eval mode."""
    folder = Path(folder)
    if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} holds no classifier ({WEIGHTS} + {CONFIG}); train one with "
            f"`python -m common.models.classifier train --out {folder}`"
        )
    card = json.loads((folder / CONFIG).read_text())
    model = ImageClassifier(ClassifierConfig(**card["config"]))
    model.load_state_dict(load_file(str(folder / WEIGHTS)))
    return model.eval().requires_grad_(False)


def accuracy(model: ImageClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images whose predicted class equals the label."""
    return (model.predict(images) == labels).float().mean().item()


def score(model: ImageClassifier, images: Tensor, labels: Tensor) -> dict[str, Any]:
    """Class-conditional accuracy of samples: overall and per prompted class."""
    pred = model.predict(images)
    hit = (pred == labels).float()
    names = model.cfg.class_names or tuple(str(k) for k in range(model.cfg.n_classes))
    per_class = {names[k]: hit[labels == k].mean().item() for k in labels.unique().tolist()}
    return {"accuracy": hit.mean().item(), "per_class_accuracy": per_class}


def train_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    cfg: ClassifierConfig | None = None,
    epochs: float = 3.0,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> ImageClassifier:
    """Adam on the cross-entropy, seeded shuffles, lr decayed linearly to 0 (images in [0, 1])."""
    cfg = cfg or ClassifierConfig(n_classes=int(labels.max()) + 1, image_size=images.shape[-1])
    if epochs <= 0 or batch_size <= 0:
        raise ValueError(f"epochs and batch_size must be > 0, got {epochs}, {batch_size}")
    torch.manual_seed(seed)
    model = ImageClassifier(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(1, int(epochs * len(images) / batch_size))
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(images), generator=g), 0
    model.train()
    for step in tqdm(range(steps), desc="classifier", disable=not progress):
        if pos + batch_size > len(images):
            perm, pos = torch.randperm(len(images), generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False)


def _cmd_train(args: argparse.Namespace) -> None:
    from common.data.images import load_fashion_mnist, resize

    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    if args.n_train:
        train = train.subset(args.n_train, seed=args.seed)
    cfg = ClassifierConfig(len(train.class_names), args.image_size, args.width, train.class_names)
    t0, c0 = time.perf_counter(), time.process_time()
    model = train_classifier(
        resize(train.images, args.image_size),
        train.labels,
        cfg=cfg,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
    )
    metrics = {
        "test_accuracy": accuracy(model, resize(test.images, args.image_size), test.labels),
        "n_train_images": len(train),
        "epochs": args.epochs,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
        "seed": args.seed,
    }
    model.save(args.out, metrics)
    print(json.dumps(metrics, indent=1))
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(metrics, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m common.models.classifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train on 16x16 Fashion-MNIST, report test accuracy")
    t.add_argument("--out", required=True, help="folder for classifier.safetensors + config.json")
    t.add_argument("--epochs", type=float, default=3.0)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--image-size", type=int, default=16)
    t.add_argument("--n-train", type=int, default=None, help="train on a seeded subset")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--metrics", default=None, help="write metrics JSON here")
    t.set_defaults(func=_cmd_train)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
