"""Command line: ``python -m common.models.clip_style train ...`` (writes the heads,
config.json and a metrics JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.models.clip_style.features import DEFAULT_FEATURE_CACHE
from common.models.clip_style.model import CLIPStyleConfig
from common.models.clip_style.training import TEMPLATES, train_clip_style


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m common.models.clip_style",
        description="Train the CLIP-style heads over frozen EfficientNet-Lite0 + MiniLM towers.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="extract features (cached), train heads, zero-shot eval")
    t.add_argument("--out", required=True, help="folder for clip_style.safetensors + config.json")
    t.add_argument(
        "--metrics", default=None, help="metrics JSON path (default: <out>/metrics.json)"
    )
    t.add_argument("--datasets", default="fashion-mnist,digits", help="comma-separated")
    t.add_argument("--n-train", type=int, default=2000, help="train images per dataset")
    t.add_argument("--n-test", type=int, default=1000, help="test images per dataset")
    t.add_argument("--d-embed", type=int, default=256)
    t.add_argument("--image-size", type=int, default=224, help="224 px -> 7x7 = 49 patch tokens")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache-dir", default=str(DEFAULT_FEATURE_CACHE), help="'' disables the cache")
    t.add_argument("--no-linear-probe", action="store_true")
    t.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not datasets:
        raise SystemExit("--datasets is empty; e.g. --datasets fashion-mnist,digits")
    unknown = [d for d in datasets if d not in TEMPLATES]
    if unknown:
        raise SystemExit(
            f"--datasets: no caption templates for {unknown}; known: {sorted(TEMPLATES)}"
        )
    try:
        CLIPStyleConfig(d_embed=args.d_embed, image_size=args.image_size)
        _, metrics = train_clip_style(
            datasets=datasets,
            n_train=args.n_train,
            n_test=args.n_test,
            d_embed=args.d_embed,
            image_size=args.image_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            seed=args.seed,
            cache_dir=args.cache_dir or None,
            out=args.out,
            linear_probe=not args.no_linear_probe,
            progress=not args.no_progress,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    path = Path(args.metrics) if args.metrics else Path(args.out) / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1) + "\n")
    summary = {
        name: {k: round(v, 4) for k, v in d.items() if "accuracy" in k}
        for name, d in metrics["datasets"].items()
    }
    print(json.dumps(summary), file=sys.stdout)
    return 0
