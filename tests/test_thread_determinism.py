"""Training gives the same weights whatever the number of CPU threads (issue: TopK differed).

Each thread count runs in a fresh process (torch sizes its thread pool once per process) and
trains every architecture of the toy profile on the same data with ``torch.set_num_threads(n)``;
the saved weights must be byte-identical for n = 1 and 2. The TopK family's least-squares initial
scale used to be a flat float32 ``sum()`` over N x d entries, which torch splits across threads,
so its rounding, and every weight after it, depended on the thread count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from common.params import load_yaml

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
from common.activations.files import load_activation_file
from common.train import TensorBatches, TrainConfig, train
x = load_activation_file(sys.argv[2], key="x")
for arch, hyper in json.loads(sys.argv[4]).items():
    cfg = TrainConfig(architecture=arch, sae=hyper, steps=5, batch_size=1024)
    train(cfg, TensorBatches(x, 1024, seed=0), f"{sys.argv[3]}/{arch}", resume=False,
          progress=False)
"""


def test_weights_do_not_depend_on_thread_count(tmp_path: Path) -> None:
    import json

    saes = load_yaml((ROOT / "params.yaml").read_text())["toy_train"]["saes"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.1 + 1.0
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    for threads in (1, 2):
        subprocess.run(
            [
                sys.executable,
                "-c",
                SCRIPT,
                str(threads),
                str(tmp_path / "x.safetensors"),
                str(tmp_path / f"threads{threads}"),
                json.dumps(saes),
            ],
            check=True,
            cwd=ROOT,
        )
    differ = [
        arch
        for arch in saes
        if (tmp_path / "threads1" / arch / "sae" / "sae.safetensors").read_bytes()
        != (tmp_path / "threads2" / arch / "sae" / "sae.safetensors").read_bytes()
    ]
    assert not differ, f"weights differ between 1 and 2 threads for {differ}"
