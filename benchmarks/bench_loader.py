"""Streaming-loader throughput and memory, as ratios against a TopK SAE training step.

For each storage dtype: write an ``N x d`` store to a temporary folder (random rows), evict its
pages from the OS cache (``posix_fadvise DONTNEED`` on our own files only), then stream shuffled
batches through ``ActivationStore.batches`` and time them (a cold read; later windows of the same
run are cold too since each chunk is read once per epoch). The baseline in the same run is one
training step (``common.train.train_step``: loss, backward, clipping, Adam) of a TopK SAE
(``build_sae("topk")``; ``relu`` if the registry has no topk) at the same batch size:

    ratio = loader vectors/s / SAE-step vectors/s        (> 1: the loader is not the bottleneck)

Memory: peak resident memory while streaming (VmHWM after resetting it through
``/proc/self/clear_refs``) against the store's size on disk.

    python benchmarks/bench_loader.py                  # 1M x 576, fp16 and fp32, ~1-2 min
    python benchmarks/bench_loader.py --tokens 2000000 --out benchmarks/results/loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common.activations.store import ActivationStore, ActivationStoreWriter
from common.sae import build_sae
from common.sae.registry import available_architectures
from common.train import TrainConfig, make_optimizer, train_step


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)
        return True
    except OSError:
        return False


def _evict(store: ActivationStore) -> None:
    for shard in store.shards:
        fd = os.open(store.root / shard["file"], os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_store(root: Path, n_tokens: int, d: int, dtype: str, seed: int = 0) -> float:
    """Write ``n_tokens`` random rows; returns seconds. One random block, varied per chunk."""
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(65536, d, generator=g)
    start = time.perf_counter()
    meta = {"model": "random", "site": "bench", "dataset": f"randn seed {seed}"}
    with ActivationStoreWriter(root, d=d, dtype=dtype, shard_tokens=65536, metadata=meta) as w:
        for i, a in enumerate(range(0, n_tokens, len(block))):
            w.append(block[: min(len(block), n_tokens - a)].roll(i, dims=1) + 0.01 * i)
    return time.perf_counter() - start


def stream(store: ActivationStore, batch_size: int, n_batches: int) -> dict[str, float]:
    _evict(store)
    loader = store.batches(batch_size, seed=0)
    base_kb = _status_kb("VmRSS")
    exact_peak = _reset_peak_rss()
    sampled_peak_kb = base_kb
    start = time.perf_counter()
    for step, x in zip(range(n_batches), loader.iterate(0), strict=False):
        assert x.shape == (batch_size, store.d_in)
        if step % 8 == 0:
            sampled_peak_kb = max(sampled_peak_kb, _status_kb("VmRSS"))
    seconds = time.perf_counter() - start
    peak_kb = _status_kb("VmHWM") if exact_peak else sampled_peak_kb
    return {
        "loader_vectors_per_s": n_batches * batch_size / seconds,
        "peak_rss_mb": peak_kb / 1024,
        "rss_increase_mb": (peak_kb - base_kb) / 1024,
        "buffer_mb": loader.buffer_tokens * store.d_in * store.np_dtype.itemsize / 2**20,
        "windows_read": loader.windows_loaded,
    }


def sae_step_rate(d: int, batch_size: int, expansion: int, k: int, steps: int) -> dict[str, float]:
    arch = "topk" if "topk" in available_architectures() else "relu"
    hyper = {"d_in": d, "d_sae": expansion * d, **({"k": k} if arch == "topk" else {})}
    sae = build_sae(arch, **hyper)
    cfg = TrainConfig(architecture=arch, sae=hyper, steps=steps + 1, lr=1e-4)
    opt = make_optimizer(sae, cfg)
    x = torch.randn(batch_size, d, generator=torch.Generator().manual_seed(1))
    sae.init_from_data(x)
    tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long)

    def step(t: int) -> None:  # the trainer's own step
        train_step(sae, opt, x, t, cfg, tokens_since_fired)

    step(0)  # warm-up
    start = time.perf_counter()
    for t in range(1, steps + 1):
        step(t)
    seconds = (time.perf_counter() - start) / steps
    return {
        "arch": arch,
        "d_sae": expansion * d,
        "sae_step_s": seconds,
        "sae_vectors_per_s": batch_size / seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=576, help="576 = SmolLM2-135M's d_model")
    p.add_argument("--dtypes", nargs="+", default=["float16", "float32"])
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--loader-batches", type=int, default=100)
    p.add_argument("--sae-steps", type=int, default=2)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument(
        "--tmp", default=None, help="folder for the temporary stores (default: system tmp)"
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    sae = sae_step_rate(args.d, args.batch_size, args.expansion, args.k, args.sae_steps)
    print(
        f"{sae['arch']} SAE step (d={args.d}, d_sae={sae['d_sae']}, k={args.k}, batch "
        f"{args.batch_size}): {sae['sae_step_s']:.3f} s = {sae['sae_vectors_per_s']:,.0f} vectors/s"
    )
    results: dict = {"config": vars(args), "sae": sae, "stores": {}}
    for dtype in args.dtypes:
        folder = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.tmp))
        try:
            write_s = write_store(folder, args.tokens, args.d, dtype)
            store = ActivationStore(folder)
            for i in range(len(store.shards)):  # checksums once, outside the timed cold read
                store.check_shard(i)
            r = stream(store, args.batch_size, args.loader_batches)
            r["write_vectors_per_s"] = args.tokens / write_s
            r["store_mb"] = store.nbytes / 2**20
            r["ratio_vs_sae_step"] = r["loader_vectors_per_s"] / sae["sae_vectors_per_s"]
            r["peak_rss_over_store"] = r["peak_rss_mb"] / r["store_mb"]
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        results["stores"][dtype] = r
        print(
            f"{dtype}: store {r['store_mb']:,.0f} MB, write {r['write_vectors_per_s']:,.0f} vec/s;"
            f" loader {r['loader_vectors_per_s']:,.0f} vec/s = {r['ratio_vs_sae_step']:.1f}x the"
            f" SAE step; peak RSS {r['peak_rss_mb']:,.0f} MB (+{r['rss_increase_mb']:,.0f} MB"
            f" while streaming, buffer {r['buffer_mb']:.0f} MB)"
            f" = {r['peak_rss_over_store']:.2f}x the store"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
