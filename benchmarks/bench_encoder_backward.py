"""The encoder backward of a TopK SAE, dW_enc = (x - b_dec)^T G, computed four ways on the CPU.

G is the B x M matrix of dL/dpre: k nonzeros per row (only the selected pre-activations get a
gradient), so the product costs B k d instead of the dense B M d. Ways, each giving the (M, d)
gradient (W_enc is stored as the transpose of an (M, d) block, so this is written in place):

* ``embedding_bag``: ``common.sae.sparse_ops.sum_by_col``, the one training uses: entries sorted
  by latent, one weighted embedding bag per latent over the rows of x (no E x d temporary).
* ``sparse_csr_mm`` / ``sparse_coo_mm``: ``torch.sparse.mm(G^T, x)`` with G^T built as CSR / COO.
* ``index_add``: ``index_add_`` of g-scaled rows of x, in chunks of 16384 entries.
* ``dense``: ``x^T G`` with G materialised (what autograd of the dense matmul costs).

    .venv/bin/python benchmarks/bench_encoder_backward.py --d-in 768 --expansion 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from common.sae.sparse_ops import sum_by_col


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return platform.machine()


def ways(x: Tensor, rows: Tensor, cols: Tensor, g: Tensor, m: int) -> dict[str, Callable]:
    n = x.shape[0]

    def csr() -> Tensor:
        gt = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (m, n), check_invariants=False)
        return torch.sparse.mm(gt.coalesce().to_sparse_csr(), x)

    def coo() -> Tensor:
        gt = torch.sparse_coo_tensor(torch.stack([cols, rows]), g, (m, n), check_invariants=False)
        return torch.sparse.mm(gt, x)

    def index_add(chunk: int = 16384) -> Tensor:
        out = x.new_zeros(m, x.shape[1])
        for s in range(0, rows.numel(), chunk):
            sl = slice(s, s + chunk)
            out.index_add_(0, cols[sl], x.index_select(0, rows[sl]) * g[sl, None])
        return out

    def dense() -> Tensor:
        return (x.t() @ x.new_zeros(n, m).index_put_((rows, cols), g)).t()

    return {
        "embedding_bag": lambda: sum_by_col(x, rows, cols, g, m),
        "sparse_csr_mm": csr,
        "sparse_coo_mm": coo,
        "index_add": index_add,
        "dense": dense,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-in", type=int, default=768)
    p.add_argument("--expansion", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/encoder_backward.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, d, m, k = args.batch_size, args.d_in, args.d_in * args.expansion, args.k
    x, g = torch.randn(n, d), torch.randn(n * k)
    cols = torch.rand(n, m).topk(k, dim=1).indices.flatten()
    rows = torch.arange(n).repeat_interleave(k)
    results, ref = [], None
    for name, fn in ways(x, rows, cols, g, m).items():
        out = fn()  # warm-up, and the value checked against the reference
        ref = out if ref is None else ref
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        seconds = sorted(times)[len(times) // 2]
        err = ((out - ref).norm() / ref.norm()).item()
        results.append({"method": name, "seconds_median": seconds, "rel_error_vs_first": err})
        print(f"  {name:15s} {seconds:.3f} s  rel. error {err:.1e}", flush=True)
    base = results[0]["seconds_median"]
    for r in results:
        r["time_vs_embedding_bag"] = r["seconds_median"] / base
    payload = {
        "benchmark": "TopK encoder backward x^T G, fp32, CPU",
        "machine": {
            "cpu": cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average_at_end": list(os.getloadavg()),
        },
        "settings": vars(args),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
