"""Every architecture's training step against our TopK step, sparsify's, and the one-matmul floor.

The targets of the sparse-path work, measured side by side in one process (steps interleaved on
the same batches, medians reported, so a change of load hits every row alike):

* every architecture's step within 1.5x of our TopK step (d_in 384, expansion 8, batch 4096,
  L0 about 32);
* our TopK step at least 2x eai-sparsify's;
* at expansion 32 and d_in 768, our TopK step at least 80% of the one-matmul floor: the encoder's
  forward matmul plus the top-k selection alone (``floor_seconds / topk_seconds >= 0.8``).

Each step is ``common.train.train_step`` (loss, backward, gradient surgery, clipping, fused Adam,
projections, dead-latent counters). The thresholded architectures (ReLU, gated, JumpReLU) have no
k: their bias (or threshold) is shifted once, before timing, so that about ``k`` latents fire per
token, the L0 the others have by construction; the L0 measured on the last batch is reported.
Peak memory is measured in a second, sequential pass: the peak resident set of a few steps of one
implementation at a time, above the resident set before it was built (``/proc/self/clear_refs``).

    .venv/bin/python benchmarks/bench_architectures.py --threads 2
    .venv/bin/python benchmarks/bench_architectures.py --threads 2 --d-in 768 --expansion 32 \\
        --archs topk --out benchmarks/results/architectures_768x32.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from bench_loader import _reset_peak_rss, _status_kb
from bench_train import SuperpositionStream, cpu_name, sparsify
from torch import Tensor

from common.sae import build_sae
from common.sae.registry import available_architectures, get_architecture
from common.train import TrainConfig, make_optimizer, train_step

RESULTS = Path(__file__).parent / "results" / "architectures.json"
THRESHOLDED = {"relu": "b_enc", "gated": "b_gate", "jumprelu": "b_enc"}


@dataclass
class Timed:
    name: str
    step: Callable[[Tensor], None]
    l0: Callable[[Tensor], float] = lambda x: float("nan")
    times: list[float] = field(default_factory=list)


def hyperparameters(arch: str, k: int) -> dict:
    """The architecture's defaults, with k (or nested ks ending at k) where it has one."""
    fields = get_architecture(arch).config_class.__dataclass_fields__
    if "ks" in fields:
        return {"ks": [k // 4, k // 2, k]}
    return {"k": k} if "k" in fields else {}


@torch.no_grad()
def calibrate_l0(sae: torch.nn.Module, arch: str, x: Tensor, k: int) -> None:
    """Shift a thresholded SAE's bias so that about k of its M latents fire per token of x."""
    pre = sae.gate_pre_activations(x) if arch == "gated" else sae.pre_activations(x)
    rows = pre[: max(1, 2**24 // pre.shape[1])].flatten()  # torch.kthvalue on a few M entries
    cut = rows.kthvalue(int(rows.numel() * (1 - k / pre.shape[1]))).values
    theta = float(sae.threshold.mean()) if arch == "jumprelu" else 0.0
    getattr(sae, THRESHOLDED[arch]).sub_(cut - theta)


def ours(arch: str, d_in: int, d_sae: int, k: int, x0: Tensor) -> Timed:
    cfg = TrainConfig(architecture=arch, steps=10**6)
    sae = build_sae(arch, d_in=d_in, d_sae=d_sae, seed=0, **hyperparameters(arch, k))
    sae.init_from_data(x0)
    if arch in THRESHOLDED:
        calibrate_l0(sae, arch, x0, k)
    opt = make_optimizer(sae, cfg)
    counters = torch.zeros(d_sae, dtype=torch.long)
    state = {"step": 0}

    def step(x: Tensor) -> None:
        train_step(sae, opt, x, state["step"], cfg, counters)
        state["step"] += 1

    def l0(x: Tensor) -> float:
        with torch.no_grad():
            return float((sae.encode(x) != 0).sum(1).float().mean())

    return Timed(arch, step, l0)


def floor(d_in: int, d_sae: int, k: int, x0: Tensor) -> Timed:
    """The encoder forward matmul into a reused buffer and the per-row top-k: no step is cheaper."""
    g = torch.Generator().manual_seed(0)
    w, b, b_dec = torch.randn(d_sae, d_in, generator=g).t(), torch.zeros(d_sae), x0.mean(0)
    buf = torch.empty(x0.shape[0], d_sae)

    def step(x: Tensor) -> None:
        torch.addmm(b, x - b_dec, w, out=buf).topk(k, dim=1, sorted=False)

    return Timed("floor (encoder matmul + top-k)", step)


def peer(d_in: int, d_sae: int, k: int, x0: Tensor) -> Timed:
    runner = sparsify("topk", d_in, d_sae, k, 0.0, x0, None)
    return Timed("sparsify topk", runner.step)


def builders(args: argparse.Namespace, d_in: int, d_sae: int, x0: Tensor) -> dict:
    made: dict[str, Callable[[], Timed]] = {
        a: (lambda a=a: ours(a, d_in, d_sae, args.k, x0)) for a in args.archs
    }
    made["sparsify topk"] = lambda: peer(d_in, d_sae, args.k, x0)
    made["floor"] = lambda: floor(d_in, d_sae, args.k, x0)
    return made


def peak_memory_mb(build: Callable[[], Timed], batches: list[Tensor]) -> float:
    """Peak resident set above the one before ``build``, over a few steps (Linux). Run in a
    process of its own (``--memory-of``): freed memory that the allocator keeps would hide a
    later implementation's peak inside an earlier one's."""
    base = _status_kb("VmRSS")
    _reset_peak_rss()
    timed = build()
    for x in batches:
        timed.step(x)
    return (_status_kb("VmHWM") - base) / 1024


def measure_memory(argv: list[str], names: list[str], d_in: int, expansion: int) -> dict:
    """Each implementation's ``peak_memory_mb`` from a fresh process."""
    memory: dict[str, float | None] = {}
    for name in names:
        cmd = [sys.executable, __file__, *argv, "--d-in", str(d_in), "--expansion"]
        cmd += [str(expansion), "--memory-of", name]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
        memory[name] = float(done.stdout.split()[-1]) if done.returncode == 0 else None
    return memory


def run(args: argparse.Namespace, d_in: int, expansion: int) -> list[dict]:
    d_sae = d_in * expansion
    data = SuperpositionStream(d_in, args.batch_size, seed=0)
    x0 = data.batch(10**6)
    made = builders(args, d_in, d_sae, x0)
    if args.memory_of:
        print(peak_memory_mb(made[args.memory_of], [data.batch(s) for s in range(2)]))
        return []
    memory = measure_memory(args.argv, list(made), d_in, expansion)
    runners = [b() for b in made.values()]
    started = time.perf_counter()
    for step in range(args.warmup + args.steps):
        x = data.batch(step)
        for r in runners:
            t0 = time.perf_counter()
            r.step(x)
            if step >= args.warmup:
                r.times.append(time.perf_counter() - t0)
        if step >= args.warmup + 2 and time.perf_counter() - started > args.max_seconds:
            break
    topk = statistics.median(next(r for r in runners if r.name == "topk").times)
    rows = []
    for name, r in zip(made, runners, strict=True):
        median = statistics.median(r.times)
        rows.append(
            {
                "d_in": d_in,
                "expansion": expansion,
                "name": r.name,
                "step_seconds_median": median,
                "timed_steps": len(r.times),
                "ratio_to_our_topk": median / topk,
                "l0_last_batch": r.l0(x),
                "peak_memory_mb": memory[name],
            }
        )
        print(f"  {r.name:32s} {median:7.3f} s  {median / topk:5.2f}x topk", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| d_in | exp | step | s/step | x our TopK step | L0 | peak MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = "" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(
            f"| {r['d_in']} | {r['expansion']} | {r['name']} | {r['step_seconds_median']:.3f} "
            f"| {r['ratio_to_our_topk']:.2f} | {r['l0_last_batch']:.1f} | {mem} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--d-in", type=int, nargs="+", default=[384])
    p.add_argument("--expansion", type=int, nargs="+", default=[8])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    archs = available_architectures()
    p.add_argument("--archs", nargs="+", default=archs, choices=archs)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # one child process
    args = p.parse_args(argv)
    args.argv = ["--batch-size", str(args.batch_size), "--k", str(args.k)]
    args.argv += ["--threads", str(args.threads), "--archs", *args.archs]
    if "topk" not in args.archs:
        args.archs.append("topk")  # the reference every ratio is taken against
    torch.set_num_threads(args.threads)
    rows = []
    for d_in in args.d_in:
        for expansion in args.expansion:
            print(f"d_in {d_in}, expansion {expansion}, batch {args.batch_size}", flush=True)
            rows += run(args, d_in, expansion)
    if args.memory_of:
        return
    print("\n" + table(rows))
    result = {
        "benchmark": "training step of every architecture vs our TopK, sparsify and the floor",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "sparsify": version("eai-sparsify"),
            "load_average_at_end": os.getloadavg(),
        },
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "argv")},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(rows) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
