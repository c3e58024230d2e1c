"""Data-parallel training (``common.distributed``): 2 gloo processes on the CPU train the same SAE
as 1 process with the same global batch, to float tolerance; resuming a 2-process run gives the
uninterrupted 2-process result; the ranks' batch slices make up the global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from common import distributed
from common.activations.store import ActivationStore, ActivationStoreWriter
from common.distributed import DistContext
from common.train import FINAL_DIR, BatchSource, TensorBatches, TrainConfig, train

pytestmark = pytest.mark.skipif(
    not (torch_dist.is_available() and torch_dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this PyTorch build",
)

WORLD = 2
N, D, BATCH, STEPS = 4096, 32, 256, 20
META = {"model": "toy", "revision": "r0", "site": "resid_post.0", "dataset": "random"}
# (name, architecture, data kind): trained by 1 process and by 2 processes
JOBS: list[tuple[str, str, str]] = [
    ("relu", "relu", "tensor"),
    ("topk", "topk", "tensor"),
    ("topk_store", "topk", "store"),
    ("topk_auxk", "topk", "tensor"),  # latents die after 512 tokens: AuxK and the dead mask
]


def _x() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0)) * 2


def _cfg(arch: str, name: str = "", **overrides: Any) -> TrainConfig:
    sae: dict[str, Any] = {"d_sae": 128}
    if arch == "topk":
        sae["k"] = 8
    if name == "topk_auxk":  # latents die; a per-token AuxK loss splits across ranks exactly
        sae.update(d_sae=512, k=2, aux_normalize=False)
        overrides.setdefault("dead_after_tokens", 512)
    settings: dict[str, Any] = {"steps": STEPS, "batch_size": BATCH, "checkpoint_every": 1000}
    return TrainConfig(architecture=arch, sae=sae, **{**settings, **overrides})


def _data(kind: str, root: Path) -> BatchSource:
    if kind == "tensor":
        return TensorBatches(_x(), BATCH, seed=0)
    return ActivationStore(root / "store").batches(
        BATCH, seed=0, chunk_tokens=128, buffer_tokens=1024
    )


def _write_store(root: Path) -> None:
    with ActivationStoreWriter(root / "store", d=D, shard_tokens=1000, metadata=META) as w:
        w.append(_x())


def _worker(rank: int, port: int, root: str) -> None:
    """One rank: join the gloo group from torchrun-style variables and train every job."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
    )
    torch.set_num_threads(1)
    ctx = distributed.init_from_env("cpu")
    assert ctx is not None and ctx.world_size == WORLD
    base = Path(root)
    try:
        for name, arch, kind in JOBS:
            out = base / f"ddp_{name}"
            train(_cfg(arch, name), _data(kind, base), out, progress=False, dist=ctx)
        # interrupted after 8 steps (checkpoint at 5 and 8), then resumed to the end
        resumed = _cfg("topk", checkpoint_every=5)
        out = base / "ddp_topk_resumed"
        train(resumed, _data("tensor", base), out, stop_after=8, progress=False, dist=ctx)
        train(resumed, _data("tensor", base), out, progress=False, dist=ctx)
        train(resumed, _data("tensor", base), base / "ddp_topk_straight", progress=False, dist=ctx)
    finally:
        distributed.shutdown(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / FINAL_DIR / "sae.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    _write_store(root)
    for name, arch, kind in JOBS:  # the 1-process references, same global batch
        train(_cfg(arch, name), _data(kind, root), root / f"one_{name}", progress=False)
    mp.spawn(_worker, args=(_free_port(), str(root)), nprocs=WORLD, join=True)
    return root


@pytest.mark.parametrize("name", [job[0] for job in JOBS])
def test_two_processes_match_one(runs: Path, name: str) -> None:
    one, two = _weights(runs / f"one_{name}"), _weights(runs / f"ddp_{name}")
    assert one.keys() == two.keys()
    diff = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"{name}: max |1-process - 2-process| = {diff:.3g}")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("name", [job[0] for job in JOBS])
def test_dead_latent_counters_agree(runs: Path, name: str) -> None:
    """The counters count the global batch and the latents fired on any rank."""

    def counters(out: Path) -> torch.Tensor:
        state = load_file(str(out / "checkpoint" / "trainer_state.safetensors"))
        return state["__tokens_since_fired"]

    one, two = counters(runs / f"one_{name}"), counters(runs / f"ddp_{name}")
    assert torch.equal(one, two)
    if name == "topk_auxk":
        assert int((one >= 512).sum()) > 0, "the run should have dead latents"


def test_two_process_resume_matches_uninterrupted(runs: Path) -> None:
    resumed, straight = _weights(runs / "ddp_topk_resumed"), _weights(runs / "ddp_topk_straight")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_only_rank_zero_writes(runs: Path) -> None:
    out = runs / "ddp_relu"
    assert (out / FINAL_DIR / "sae.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", FINAL_DIR]


@pytest.mark.parametrize("kind", ["tensor", "store"])
def test_rank_slices_make_up_the_batch(tmp_path: Path, kind: str) -> None:
    if kind == "store":
        _write_store(tmp_path)
    data = _data(kind, tmp_path)
    for step in (0, 3, 15, 16, 40):  # 16 batches per epoch: 16 and 40 start later epochs
        parts = [data.rank_batch(step, r, 4) for r in range(4)]  # type: ignore[attr-defined]
        assert all(len(p) == BATCH // 4 for p in parts)
        assert torch.equal(torch.cat(parts), data.batch(step))  # type: ignore[attr-defined]


def test_refuses_what_it_cannot_split() -> None:
    ctx = DistContext(rank=0, world_size=3, local_rank=0)
    with pytest.raises(ValueError, match="divisible by the number of processes"):
        distributed.slice_for(BATCH, ctx.rank, ctx.world_size)
    from common.train import _check_distributable

    with pytest.raises(ValueError, match="divisible"):
        _check_distributable(_cfg("relu"), ctx)
    with pytest.raises(ValueError, match="not supported across processes"):
        batchtopk = TrainConfig(architecture="batchtopk", sae={"d_sae": 128, "k": 8})
        _check_distributable(batchtopk, DistContext(rank=0, world_size=2, local_rank=0))


def test_single_process_environment_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env("cpu") is None
    assert distributed.slice_for(BATCH, 0, 1) == slice(0, BATCH)
    x = torch.ones(3)
    assert distributed.all_reduce_(x, None) is x and torch.equal(x, torch.ones(3))
