"""Training gives the same weights whatever the number of CPU threads (issue: TopK differed).

Each run is a fresh process (torch's thread pool is sized once per process), trained on the same
data with ``torch.set_num_threads(n)``; the saved weights must be byte-identical for n = 1 and 2.
The TopK family's least-squares initial scale used to be a flat float32 ``sum()`` over N x d
entries, which torch splits across threads, so its rounding, and every weight after it, depended
on the thread count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SCRIPT = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from common.activations.files import load_activation_file
from common.train import TensorBatches, TrainConfig, train
x = load_activation_file(sys.argv[2], key="x")
cfg = TrainConfig(architecture=sys.argv[3], sae={"d_sae": 512, "k": 8}, steps=5, batch_size=1024)
train(cfg, TensorBatches(x, 1024, seed=0), sys.argv[4], resume=False, progress=False)
"""


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_weights_do_not_depend_on_thread_count(tmp_path: Path, architecture: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.1 + 1.0
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    weights = []
    for threads in (1, 2):
        out = tmp_path / f"run{threads}"
        subprocess.run(
            [
                sys.executable,
                "-c",
                SCRIPT,
                str(threads),
                str(tmp_path / "x.safetensors"),
                architecture,
                str(out),
            ],
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        weights.append((out / "sae" / "sae.safetensors").read_bytes())
    assert weights[0] == weights[1], f"{architecture}: weights differ between 1 and 2 threads"
