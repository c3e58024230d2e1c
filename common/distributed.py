"""Data-parallel helpers for training one SAE across processes (``torchrun``).

``init_from_env`` reads the variables ``torchrun`` sets (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) and joins the process group: gloo for CPU training, nccl for CUDA
(each process on ``cuda:LOCAL_RANK``). Without those variables, or with ``WORLD_SIZE=1``, it does
nothing and returns ``None``: the single-process path of ``common.train`` then runs unchanged.

Collectives here are averaging gradients (``all_reduce_grads``), reducing a tensor in place
(``all_reduce_``), agreeing on a flag (``all_true``), broadcasting a module's state from rank 0
(``broadcast_module``) and ``barrier``. All of them are no-ops for a ``None`` context.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor

ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a multi-process run (``world_size > 1``)."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs and the final SAE."""
        return self.rank == 0

    def device_for(self, device: str) -> torch.device:
        """The device this rank trains on: ``cuda:LOCAL_RANK`` for a bare ``cuda``, else as
        given (``cpu``, or an explicit ``cuda:i``)."""
        parsed = torch.device(device)
        if parsed.type == "cuda" and parsed.index is None:
            return torch.device("cuda", self.local_rank)
        return parsed


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


def init_from_env(device: str = "cpu") -> DistContext | None:
    """Join the process group ``torchrun`` describes in the environment, or return ``None``.

    ``None`` when ``WORLD_SIZE`` is unset or 1 (a plain single-process run). The backend is nccl
    when ``device`` is CUDA, else gloo; a group already initialised (by the caller) is reused.
    """
    if "WORLD_SIZE" not in os.environ or _env_int("WORLD_SIZE") <= 1:
        return None
    missing = [name for name in ENV_VARS if name not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not; start the run with "
            f"`torchrun --nproc-per-node N -m common.train ...`"
        )
    if not torch_dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; train in one process")
    ctx = DistContext(
        rank=_env_int("RANK"),
        world_size=_env_int("WORLD_SIZE"),
        local_rank=_env_int("LOCAL_RANK"),
    )
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(ctx.device_for(device))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if cuda else "gloo")
    if torch_dist.get_world_size() != ctx.world_size or torch_dist.get_rank() != ctx.rank:
        raise RuntimeError(
            f"the process group (rank {torch_dist.get_rank()} of {torch_dist.get_world_size()}) "
            f"disagrees with RANK={ctx.rank}, WORLD_SIZE={ctx.world_size}"
        )
    return ctx


def current() -> DistContext | None:
    """The context of an already initialised process group with more than one process, else
    ``None`` (for callers of ``train`` that set the group up themselves)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return None
    world = torch_dist.get_world_size()
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", torch_dist.get_rank()))
    return DistContext(rank=torch_dist.get_rank(), world_size=world, local_rank=local)


def shutdown(ctx: DistContext | None) -> None:
    """Leave the process group (if this process joined one)."""
    if ctx is not None and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def barrier(ctx: DistContext | None) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx is not None:
        torch_dist.barrier()


def all_reduce_(tensor: Tensor, ctx: DistContext | None, op: str = "sum") -> Tensor:
    """Reduce ``tensor`` across ranks in place (``op``: sum, max, min) and return it.

    A non-contiguous tensor is reduced through a contiguous copy."""
    if ctx is None:
        return tensor
    ops = {"sum": torch_dist.ReduceOp.SUM, "max": torch_dist.ReduceOp.MAX}
    ops["min"] = torch_dist.ReduceOp.MIN
    if op not in ops:
        raise ValueError(f"op must be one of {sorted(ops)}, got {op!r}")
    if tensor.is_contiguous():
        torch_dist.all_reduce(tensor, op=ops[op])
    else:
        buf = tensor.contiguous()
        torch_dist.all_reduce(buf, op=ops[op])
        tensor.copy_(buf)
    return tensor


def all_true(flag: bool | Tensor, ctx: DistContext | None, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (so that all ranks take the same branch)."""
    value = torch.as_tensor(flag, device=device).to(torch.int32).reshape(1)
    return bool(all_reduce_(value, ctx, op="min").item())


def all_reduce_grads(module: torch.nn.Module, ctx: DistContext | None) -> None:
    """Average the parameters' gradients across ranks (sum, then divide by the world size).

    One flattened bucket, so a gradient with odd strides (a transposed parameter) is fine. A
    parameter whose gradient is ``None`` on some ranks takes zeros there; it stays ``None`` only
    where no rank produced one (so that every rank updates the same parameters)."""
    if ctx is None:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return
    device = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=device)
    all_reduce_(has, ctx, op="max")
    live = [p for p, h in zip(params, has.tolist(), strict=True) if h]
    if not live:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live]
    )
    all_reduce_(flat, ctx, op="sum")
    flat /= ctx.world_size
    offset = 0
    for p in live:
        n = p.numel()
        chunk = flat[offset : offset + n].view(p.shape)
        if p.grad is None:
            p.grad = torch.empty_like(p, memory_format=torch.preserve_format)
        p.grad.copy_(chunk)
        offset += n


def broadcast_module(module: torch.nn.Module, ctx: DistContext | None, src: int = 0) -> None:
    """Copy the parameters and floating/integer buffers of rank ``src`` to every rank."""
    if ctx is None:
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_contiguous():
                torch_dist.broadcast(t.data, src=src)
            else:
                buf = t.data.contiguous()
                torch_dist.broadcast(buf, src=src)
                t.data.copy_(buf)


def slice_for(batch_size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s rows ``[r*B/W, (r+1)*B/W)`` of a global batch of ``B = batch_size`` rows
    split over ``W = world_size`` processes; ``ValueError`` unless ``W`` divides ``B``."""
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} (the global batch) must be divisible by the number of "
            f"processes ({world_size})"
        )
    per = batch_size // world_size
    return slice(rank * per, (rank + 1) * per)
