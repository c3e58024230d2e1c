"""Training throughput (vectors / second) of our SAEs against SAELens and eai-sparsify, one process.

Every implementation trains from its own initialisation on the same batches, with its own optimiser
and training step, as its library's trainer does it:

* ``ours``: ``common.train.train_step``, the trainer's own step (loss, backward, ``before_step``,
  gradient clipping, fused Adam, ``after_step``, dead-latent counters), for ``topk`` and ``relu``.
* ``sae-lens``: ``SAETrainer.step`` (its public one-step seam: ``training_forward_pass``, backward,
  clipping, Adam, scheduler) on ``TopKTrainingSAE`` / ``StandardTrainingSAE``.
* ``sparsify``: ``SparseCoder.forward`` + backward + the default optimiser of ``sparsify.Trainer``
  (sign-SGD under ScheduleFree), decoder renormalisation and tangent gradient, as its trainer does.
  (Its trainer needs a Hugging Face model, so the step is reproduced here, not called.)

The steps of all implementations are interleaved (one step of each, in turn, on the same batch), so
a change in the load of this shared machine hits them alike; the median step time is reported.
Data: sparse superposition of 4*d_in random unit features, 16 active per vector, magnitudes
Uniform[0.5, 2) (the ``common.toy.superposition`` construction, sampled sparsely for speed).
FVU is measured on a held-out batch after the same number of steps; L0 is the mean number of
nonzero latents on it.

    .venv/bin/python benchmarks/bench_train.py --quick       # seconds
    .venv/bin/python benchmarks/bench_train.py               # d_in 384, 768 x expansion 8, 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from common.sae import build_sae
from common.sae.base import fvu
from common.toy import random_features
from common.train import TrainConfig, make_optimizer, train_step

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"


# --- data -----------------------------------------------------------------------------------------
class SuperpositionStream:
    """x = sum of ``n_active`` random unit features with magnitudes Uniform[0.5, 2); batch t is
    determined by (seed, t)."""

    def __init__(self, d_in: int, batch_size: int, n_active: int = 16, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.features = random_features(4 * d_in, d_in, g)
        self.batch_size, self.n_active, self.seed = batch_size, n_active, seed

    def batch(self, step: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        n, f = self.batch_size, self.features.shape[0]
        idx = torch.randint(0, f, (n, self.n_active), generator=g)
        mags = torch.rand(n, self.n_active, generator=g) * 1.5 + 0.5
        return F.embedding_bag(idx, self.features, per_sample_weights=mags, mode="sum")


# --- one runner per implementation ----------------------------------------------------------------
@dataclass
class Runner:
    impl: str
    arch: str
    step: Callable[[Tensor], None]
    reconstruct: Callable[[Tensor], tuple[Tensor, Tensor]]  # x -> (x_hat, z), no gradient
    times: list[float] = field(default_factory=list)


def ours(
    arch: str, d_in: int, d_sae: int, k: int, l1: float, x0: Tensor, dead: Tensor | None
) -> Runner:
    """``common.train.train_step`` itself (the trainer's whole step: learning rate, loss,
    backward, ``before_step``, clipping, fused Adam, ``after_step``, dead-latent counters) with the
    trainer's optimiser (``make_optimizer``); only logging and checkpoints are left out."""
    cfg = TrainConfig(architecture=arch, steps=10**6)
    hyper = {"k": k} if arch == "topk" else {"l1_coefficient": l1}
    sae = build_sae(arch, d_in=d_in, d_sae=d_sae, seed=0, **hyper)
    sae.init_from_data(x0)
    opt = make_optimizer(sae, cfg)
    tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
    state = {"step": 0}

    def step(x: Tensor) -> None:
        if dead is not None:  # the same forced dead latents as the peers (no latent dies this soon)
            tokens_since_fired[dead] = cfg.dead_after_tokens
        train_step(sae, opt, x, state["step"], cfg, tokens_since_fired)
        state["step"] += 1

    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        z = sae.encode(x)
        return sae.decode(z), z

    return Runner("ours", arch, step, reconstruct)


def sae_lens(
    arch: str, d_in: int, d_sae: int, k: int, l1: float, x0: Tensor, dead: Tensor | None
) -> Runner:
    """``SAETrainer.step`` of SAELens with its default Adam (lr 3e-4) and clipping."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    common = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu"}
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=k, **common))
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=l1, **common))
    with torch.no_grad():
        sae.b_dec.copy_(x0.mean(0))  # the same data-mean init as ours and sparsify
    n = x0.shape[0]
    trainer = SAETrainer(
        cfg=SAETrainerConfig(
            total_training_samples=10**9, train_batch_size_samples=n, lr_end=3e-5
        ),  # lr_end as LanguageModelSAERunnerConfig sets it (lr / 10); unused when constant
        sae=sae,
        data_provider=iter(()),
    )
    if dead is not None:  # SAELens reads the dead mask from its counters: force the same latents
        trainer.n_forward_passes_since_fired[dead] = float(trainer.cfg.dead_feature_window + 1)

    def step(x: Tensor) -> None:
        trainer.step(x)
        trainer.n_training_steps += 1
        if dead is not None:
            trainer.n_forward_passes_since_fired[dead] = float(trainer.cfg.dead_feature_window + 1)

    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        z = sae.encode(x)
        return sae.decode(z), z

    return Runner("sae-lens", arch, step, reconstruct)


def sparsify(
    arch: str, d_in: int, d_sae: int, k: int, l1: float, x0: Tensor, dead: Tensor | None
) -> Runner:
    """``SparseCoder`` with ``sparsify.Trainer``'s defaults: loss = FVU (+ auxk_alpha * AuxK),
    sign-SGD in ScheduleFree (momentum 0.95, lr 5e-3 / sqrt(M / 2^14)), unit-norm decoder."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    if arch != "topk":
        raise ValueError("sparsify only trains TopK sparse coders")
    torch.manual_seed(0)
    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), "cpu", dtype=torch.float32)
    with torch.no_grad():
        sae.b_dec.copy_(x0.mean(0))
    opt = ScheduleFreeWrapper(
        SignSGD([{"params": sae.parameters(), "lr": 5e-3 / (d_sae / 2**14) ** 0.5}]), momentum=0.95
    )
    opt.train()
    auxk_alpha = 1 / 32 if dead is not None else 0.0  # sparsify's default: 0 (no AuxK)

    def step(x: Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        loss = out.fvu + auxk_alpha * out.auxk_loss
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    def reconstruct(x: Tensor) -> tuple[Tensor, Tensor]:
        opt.eval()  # ScheduleFree evaluates at its averaged weights
        acts, idx, _ = sae.encode(x)
        x_hat = sae.decode(acts, idx)
        z = torch.zeros(x.shape[0], d_sae).scatter_(1, idx, acts)
        opt.train()
        return x_hat, z

    return Runner("sparsify", arch, step, reconstruct)


IMPLEMENTATIONS = {"ours": ours, "sae-lens": sae_lens, "sparsify": sparsify}
OURS = ("ours",)


# --- the benchmark --------------------------------------------------------------------------------
def run_config(
    d_in: int,
    expansion: int,
    args: argparse.Namespace,
) -> list[dict]:
    d_sae = d_in * expansion
    data = SuperpositionStream(d_in, args.batch_size, seed=args.seed)
    x0, x_eval = data.batch(10**6), data.batch(10**6 + 1)
    dead = None
    if args.dead_fraction > 0:
        dead = torch.rand(d_sae, generator=torch.Generator().manual_seed(1)) < args.dead_fraction
    runners = []
    for arch in args.archs:
        for impl in args.impls:
            if impl == "sparsify" and arch != "topk":
                continue
            runners.append(IMPLEMENTATIONS[impl](arch, d_in, d_sae, args.k, args.l1, x0, dead))
    started = time.perf_counter()
    n_steps = 0
    for step in range(args.warmup + args.steps):
        x = data.batch(step)
        for r in runners:
            t0 = time.perf_counter()
            r.step(x)
            if step >= args.warmup:
                r.times.append(time.perf_counter() - t0)
        n_steps = step + 1
        if step >= args.warmup + 2 and time.perf_counter() - started > args.max_seconds:
            break  # at least 3 timed steps, then stop at the time budget
    rows = []
    for r in runners:
        with torch.no_grad():
            x_hat, z = r.reconstruct(x_eval)
            fvu_eval, l0 = fvu(x_eval, x_hat).item(), (z > 0).float().sum(1).mean().item()
        median = statistics.median(r.times)
        rows.append(
            {
                "d_in": d_in,
                "expansion": expansion,
                "d_sae": d_sae,
                "arch": r.arch,
                "impl": r.impl,
                "batch_size": args.batch_size,
                "k": args.k if r.arch == "topk" else None,
                "steps_trained": n_steps,
                "timed_steps": len(r.times),
                "step_seconds_median": median,
                "step_seconds_min": min(r.times),
                "vectors_per_second": args.batch_size / median,
                "fvu": fvu_eval,
                "l0": l0,
            }
        )
        print(
            f"  {r.impl:9s} {r.arch:5s} {median:8.3f} s/step  "
            f"{args.batch_size / median:9.0f} vec/s  FVU {fvu_eval:.4f}  L0 {l0:6.1f}",
            flush=True,
        )
    return rows


def add_ratios(rows: list[dict]) -> None:
    """ratio_vs_fastest_peer = our throughput / the best peer's, per (config, architecture)."""
    for row in rows:
        peers = [
            r
            for r in rows
            if r["impl"] not in OURS
            and (r["d_in"], r["expansion"], r["arch"])
            == (row["d_in"], row["expansion"], row["arch"])
        ]
        row["ratio_vs_fastest_peer"] = None
        row["fvu_fastest_peer"] = None
        if row["impl"] in OURS and peers:
            best = max(peers, key=lambda r: r["vectors_per_second"])
            row["fastest_peer"] = best["impl"]
            row["ratio_vs_fastest_peer"] = row["vectors_per_second"] / best["vectors_per_second"]
            row["fvu_fastest_peer"] = best["fvu"]


def table(rows: list[dict]) -> str:
    head = "| d_in | exp | arch | impl | s/step | vectors/s | FVU | L0 | ours / fastest peer |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = (
            f"{r['ratio_vs_fastest_peer']:.2f}x vs {r['fastest_peer']}"
            if r.get("ratio_vs_fastest_peer")
            else ""
        )
        lines.append(
            f"| {r['d_in']} | {r['expansion']} | {r['arch']} | {r['impl']} "
            f"| {r['step_seconds_median']:.3f} | {r['vectors_per_second']:.0f} "
            f"| {r['fvu']:.4f} | {r['l0']:.1f} | {ratio} |"
        )
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    except OSError:
        pass
    return platform.machine()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-in", type=int, nargs="+", default=[384, 768])
    p.add_argument("--expansion", type=int, nargs="+", default=[8, 32])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--l1", type=float, default=0.3, help="L1 coefficient of both ReLU SAEs")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="timed steps (at most)")
    p.add_argument(
        "--max-seconds", type=float, default=120.0, help="per configuration, after 3 timed steps"
    )
    p.add_argument("--archs", nargs="+", default=["topk", "relu"], choices=["topk", "relu"])
    p.add_argument(
        "--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS)
    )
    p.add_argument(
        "--dead-fraction",
        type=float,
        default=0.0,
        help="mark this fraction of latents dead in every TopK implementation (exercises AuxK)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's choice)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quick", action="store_true", help="d_in 128, expansion 8, batch 1024, 3+5 steps"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.quick:
        args.d_in, args.expansion, args.batch_size, args.warmup, args.steps = [128], [8], 1024, 3, 5
        if args.out == RESULTS:
            args.out = RESULTS.with_name("train_throughput_quick.json")
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for d_in in args.d_in:
        for expansion in args.expansion:
            print(
                f"d_in {d_in}, expansion {expansion} (d_sae {d_in * expansion}), "
                f"batch {args.batch_size}",
                flush=True,
            )
            rows += run_config(d_in, expansion, args)
    add_ratios(rows)
    print()
    print(table(rows))
    result = {
        "benchmark": "SAE training throughput, fp32, CPU, one process, interleaved steps",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "sae_lens": version("sae-lens"),
            "sparsify": version("eai-sparsify"),
            "load_average_at_end": os.getloadavg(),  # other jobs on a shared machine
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
