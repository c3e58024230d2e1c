"""Command line: ``python -m common.models.diffusion train|sample ...`` (see the package doc)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from common.models.diffusion.sampling import class_captions, sample, save_grid
from common.models.diffusion.training import DiffusionTrainConfig, train_diffusion
from common.models.diffusion.unet import UNetConfig, load_diffusion


def _fashion_mnist(split: str, size: int, n: int | None, seed: int) -> tuple[Tensor, Tensor, tuple]:
    from common.data.images import load_fashion_mnist, resize

    data = load_fashion_mnist(split)
    if n is not None:
        data = data.subset(n, seed=seed)
    return resize(data.images, size), data.labels, data.class_names


def _cmd_train(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    unet_cfg = UNetConfig(channels=tuple(args.channels), layers_per_block=args.layers_per_block)
    cfg = DiffusionTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        ema_decay=args.ema_decay,
        p_uncond=args.p_uncond,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
    )
    images, labels, names = _fashion_mnist("train", unet_cfg.image_size, args.n_train, args.seed)
    _, metrics = train_diffusion(
        images,
        labels,
        names,
        args.out,
        unet_cfg=unet_cfg,
        cfg=cfg,
        resume=not args.no_resume,
        device=args.device,
    )
    print(json.dumps({k: v for k, v in metrics.items() if k != "loss_curve"}, indent=1))
    if args.metrics:
        Path(args.metrics).parent.mkdir(parents=True, exist_ok=True)
        Path(args.metrics).write_text(json.dumps(metrics, indent=1) + "\n")


def _cmd_sample(args: argparse.Namespace) -> None:
    from common.models.classifier import score
    from common.models.scorers import load_scorer

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_diffusion(args.model, class_names=args.class_names)
    model.unet.to(args.device)
    classifier = load_scorer(args.classifier, model.class_names) if args.classifier else None
    captions = class_captions(model, args.per_class, args.template)
    labels = torch.arange(len(model.class_names)).repeat_interleave(args.per_class)
    out = Path(args.out)
    runs = []
    for steps in [int(v) for part in args.steps for v in str(part).split(",") if v.strip()]:
        t0 = time.perf_counter()
        images = sample(
            model,
            captions,
            num_steps=steps,
            guidance_scale=args.guidance,
            eta=args.eta,
            seed=args.seed,
        )
        run: dict[str, Any] = {
            "num_steps": steps,
            "guidance_scale": args.guidance,
            "eta": args.eta,
            "seed": args.seed,
            "per_class": args.per_class,
            "sample_wall_s": round(time.perf_counter() - t0, 1),
        }
        if classifier is not None:
            run |= score(classifier, images, labels)
        runs.append(run)
        save_grid(
            images, len(model.class_names), out / f"samples_{steps}steps.png", model.class_names
        )
        print(json.dumps({k: v for k, v in run.items() if k != "per_class_accuracy"}))
    metrics = {"caption_template": model.templates[args.template], "runs": runs}
    path = Path(args.metrics) if args.metrics else out / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    from common.models import diffusion as package

    p = argparse.ArgumentParser(
        prog="python -m common.models.diffusion",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    d_cfg, d_unet = DiffusionTrainConfig(), UNetConfig()

    t = sub.add_parser("train", help="train the U-Net on 16x16 Fashion-MNIST")
    t.add_argument("--out", required=True, help="model folder (unet/, scheduler/, checkpoint)")
    t.add_argument("--steps", type=int, default=d_cfg.steps)
    t.add_argument("--batch-size", type=int, default=d_cfg.batch_size)
    t.add_argument("--lr", type=float, default=d_cfg.lr)
    t.add_argument("--ema-decay", type=float, default=d_cfg.ema_decay)
    t.add_argument("--p-uncond", type=float, default=d_cfg.p_uncond)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=int, default=d_cfg.checkpoint_every)
    t.add_argument("--channels", type=int, nargs="+", default=list(d_unet.channels))
    t.add_argument("--layers-per-block", type=int, default=d_unet.layers_per_block)
    t.add_argument("--n-train", type=int, default=None, help="train on a seeded subset")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    t.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--metrics", default=None, help="write training metrics JSON here")
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="draw a class grid and score it with the classifier")
    s.add_argument("--model", required=True)
    s.add_argument(
        "--classifier",
        default=None,
        help="scorer: a folder from common.models.classifier, or a CLIP (zero-shot) for a hub "
        "pipeline's images",
    )
    s.add_argument(
        "--class-names", nargs="+", default=None, help="concepts to prompt (hub pipelines)"
    )
    s.add_argument("--per-class", type=int, default=16)
    s.add_argument(
        "--steps", nargs="+", default=["10"], help="DDIM steps, several ok: 1 4 10 or 1,4,10"
    )
    s.add_argument("--guidance", type=float, default=3.0)
    s.add_argument("--eta", type=float, default=1.0, help="DDIM eta (0: deterministic ODE)")
    s.add_argument("--template", type=int, default=0, help="index into the caption templates")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    s.add_argument("--out", required=True, help="folder for samples_<k>steps.png")
    s.add_argument("--metrics", default=None, help="metrics JSON (default OUT/metrics.json)")
    s.set_defaults(func=_cmd_sample)

    args = p.parse_args(argv)
    args.func(args)
