"""Extraction throughput against the bare forward pass, and peak memory against the token count.

Throughput: the same WordNet token windows go through (a) the bare base model truncated to the
deepest hooked block (``model.model`` with ``layers[:L+1]``: no hooks, no LM head, no store), and
(b) ``common.activations.extract.extract`` with hooks on the sites, early stopping, masking, and
the writes into an ``ActivationStoreWriter`` in a temporary folder:

    ratio = extract tokens/s / bare-forward tokens/s        (target >= 0.9)

Both are timed ``--repeats`` times, alternating, and the best time of each is used (the machine
is shared). Tokens/s counts window positions (``B * T``) for both.

Memory: for two token counts N, a fresh subprocess loads the model, warms up, resets its peak
RSS (``/proc/self/clear_refs``), extracts N tokens and reports peak RSS minus the RSS before
extraction. Streaming means this does not grow with N (the writer holds one shard buffer).

    python benchmarks/bench_extract.py                              # SmolLM2, CPU, ~2-3 min
    python benchmarks/bench_extract.py --tokens 4096 --out benchmarks/results/extract.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from common.activations.extract import extract, window_batches
from common.activations.store import ActivationStoreWriter
from common.data.text import load_corpus, tokenize_windows
from common.models import load_model, resolve_site


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _windows(loaded, n_tokens: int, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_windows = -(-n_tokens // context_len)
    corpus = load_corpus("wordnet", "train", seed=0)  # tokenize_windows stops at n_windows
    w = tokenize_windows(corpus.texts, loaded.tokenizer, context_len, max_windows=n_windows)
    return w.ids, w.keep


def _writers(root: Path, widths: dict[str, int], shard_tokens: int) -> dict:
    return {
        s: ActivationStoreWriter(
            root / s, d=d, dtype="float32", shard_tokens=shard_tokens, metadata={"site": s}
        )
        for s, d in widths.items()
    }


def _bare_forward(loaded, ids: torch.Tensor, batch_size: int, last_layer: int) -> float:
    """Seconds for the base model truncated after ``last_layer`` over all windows, no hooks."""
    base = loaded.model.model
    layers = base.layers
    base.layers = nn.ModuleList(list(layers)[: last_layer + 1])
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(ids), batch_size):
                base(input_ids=ids[i : i + batch_size], use_cache=False)
        return time.perf_counter() - start
    finally:
        base.layers = layers


def _extract_once(loaded, ids, keep, sites, widths, batch_size, shard_tokens) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        stores = _writers(Path(tmp), widths, shard_tokens)
        start = time.perf_counter()
        extract(loaded, window_batches(ids, keep, batch_size), sites, stores, progress=False)
        return time.perf_counter() - start


def throughput(args: argparse.Namespace) -> dict:
    loaded = load_model(args.model)
    sites = args.sites.split(",")
    last = max(resolve_site(loaded.model, s).layer for s in sites)
    ids, keep = _windows(loaded, args.tokens, args.context_len)
    widths = {s: loaded.model.config.hidden_size for s in sites}
    # warm-up (allocator, kernels) on one batch each
    _bare_forward(loaded, ids[: args.batch_size], args.batch_size, last)
    _extract_once(
        loaded,
        ids[: args.batch_size],
        keep[: args.batch_size],
        sites,
        widths,
        args.batch_size,
        args.shard_tokens,
    )
    bare, ext = [], []
    for _ in range(args.repeats):
        bare.append(_bare_forward(loaded, ids, args.batch_size, last))
        ext.append(
            _extract_once(loaded, ids, keep, sites, widths, args.batch_size, args.shard_tokens)
        )
    n = ids.numel()
    return {
        "model": loaded.name,
        "weights": loaded.metadata.get("weights"),
        "sites": sites,
        "deepest_layer": last,
        "tokens": n,
        "stored_tokens_per_site": int(keep.sum()),
        "batch_size": args.batch_size,
        "context_len": args.context_len,
        "threads": torch.get_num_threads(),
        "bare_seconds": bare,
        "extract_seconds": ext,
        "bare_tokens_per_s": n / min(bare),
        "extract_tokens_per_s": n / min(ext),
        "ratio_best": min(bare) / min(ext),
        "ratio_median": sorted(bare)[len(bare) // 2] / sorted(ext)[len(ext) // 2],
    }


def rss_child(args: argparse.Namespace) -> dict:
    """Run in a subprocess: peak RSS growth while extracting ``args.rss_child`` tokens."""
    loaded = load_model(args.model)
    sites = args.sites.split(",")
    ids, keep = _windows(loaded, args.rss_child, args.context_len)
    widths = {s: loaded.model.config.hidden_size for s in sites}
    warm = 4 * args.batch_size  # the allocator settles after a few batches
    _extract_once(
        loaded, ids[:warm], keep[:warm], sites, widths, args.batch_size, args.shard_tokens
    )
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    before = _status_kb("VmRSS")
    _extract_once(loaded, ids, keep, sites, widths, args.batch_size, args.shard_tokens)
    peak = _status_kb("VmHWM")
    return {
        "tokens": ids.numel(),
        "rss_before_mb": before / 1024,
        "peak_mb": peak / 1024,
        "growth_mb": (peak - before) / 1024,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sites", default="resid_post.6,mlp_out.6")
    p.add_argument("--tokens", type=int, default=4096, help="window positions for throughput")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--rss-tokens", default="16384,65536", help="two token counts for the RSS test")
    p.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child is not None:
        print(json.dumps(rss_child(args)))
        return

    result = throughput(args)
    print(
        f"throughput: bare {result['bare_tokens_per_s']:.0f} tok/s, extract "
        f"{result['extract_tokens_per_s']:.0f} tok/s, ratio {result['ratio_best']:.3f} "
        f"(median {result['ratio_median']:.3f})"
    )
    memory = []
    for n in (int(x) for x in args.rss_tokens.split(",")):
        cmd = [sys.executable, __file__, "--rss-child", str(n), "--model", args.model]
        cmd += ["--sites", args.sites, "--context-len", str(args.context_len)]
        cmd += ["--batch-size", str(args.batch_size), "--shard-tokens", str(args.shard_tokens)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        memory.append(json.loads(out.strip().splitlines()[-1]))
        print(
            f"memory: {memory[-1]['tokens']} tokens -> peak RSS growth "
            f"{memory[-1]['growth_mb']:.1f} MB (peak {memory[-1]['peak_mb']:.0f} MB)"
        )
    result["memory"] = memory
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
