"""One training loop for every SAE architecture.

Adam (fused where PyTorch has the kernel), linear learning-rate warm-up and an optional linear
decay over the last part of training, gradient-norm clipping, the architecture's own gradient
surgery and projections (``before_step`` / ``after_step``), dead-latent tracking (read from the
sparse code where the architecture returns one), dvclive logging of loss / FVU / L0 / dead
fraction, and checkpoints that resume to the same final weights as an uninterrupted run.
``train_step`` is the whole step; ``train`` adds data, logging and checkpoints around it (and
``benchmarks/bench_train.py`` times it).

Determinism: the batch at step ``t`` depends only on ``(seed, t)`` (see ``TensorBatches``), and the
checkpoint holds the weights, Adam moments and dead-latent counters, so stopping and resuming does
not change the result. It also records every setting of the run (``TrainConfig``) and the identity
of its data (``data_fingerprint``); a run resumes only when all that changes the result matches.
Non-finite losses, gradients or weights stop the run before they reach a checkpoint.

Command line (any architecture, on any ``N x d`` activation file)::

    python -m common.train --data acts.npy --arch topk --set d_sae=4096 --set k=32 \
        --steps 2000 --batch-size 4096 --out runs/topk
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import numbers
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from common import distributed
from common.device import resolve_device
from common.distributed import DistContext
from common.sae import SAE, TrainContext, build_sae
from common.sae.base import LossOutput, code_stats, fvu

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "sae"
SNAPSHOT_DIR = "snapshots"  # snapshots/<fraction>/: the SAE after that fraction of the steps
TRAINER_STATE_JSON = "trainer_state.json"  # written last: its presence marks a complete checkpoint
# TrainConfig fields that do not change the trained weights, so a resumed run may change them.
RESULT_NEUTRAL = frozenset({"log_every", "checkpoint_every", "snapshot_fractions"})
FULL_HASH_BYTES = 64 * 2**20  # tensors up to this size are hashed whole, larger ones by rows
SAMPLED_ROWS = 4096


class TrainingDiverged(RuntimeError):
    """The loss, a gradient or a weight became NaN/Inf; no checkpoint is written from then on."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: damaged, or written by a run with other settings."""


class BatchSource(Protocol):
    """Anything that yields training batches deterministically from a given step on.

    A source may also define ``fingerprint() -> dict`` (JSON-able): the identity of the batches it
    yields, stored in checkpoints so that a resume on other data is refused (see
    ``data_fingerprint``)."""

    d_in: int

    def iterate(self, start_step: int) -> Iterator[Tensor]: ...

    def sample(self, n: int) -> Tensor: ...


class TensorBatches:
    """Shuffled batches from an in-memory ``N x d`` tensor; batch ``t`` depends only on (seed, t).

    Each epoch uses a fresh permutation drawn from ``seed + epoch``; a batch that straddles an
    epoch boundary takes the tail of one permutation and the head of the next.
    """

    def __init__(self, x: Tensor, batch_size: int, seed: int = 0) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.x, self.batch_size, self.seed = x, batch_size, seed
        self.d_in = x.shape[1]
        self._perm_cache: dict[int, Tensor] = {}

    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {
                epoch: torch.randperm(
                    len(self.x), generator=torch.Generator().manual_seed(self.seed + epoch)
                )
            }
        return self._perm_cache[epoch]

    def batch(self, step: int) -> Tensor:
        return self.x[self._indices(step)]

    def rank_batch(self, step: int, rank: int, world_size: int) -> Tensor:
        """Rank ``rank``'s rows ``[r*B/W, (r+1)*B/W)`` of ``batch(step)`` (``W = world_size``),
        gathering only those rows; the ranks' slices, in rank order, make up the batch."""
        return self.x[self._indices(step)[distributed.slice_for(self.batch_size, rank, world_size)]]

    def _indices(self, step: int) -> Tensor:
        """Row indices of batch ``step``."""
        n, start = len(self.x), step * self.batch_size
        idx = []
        while sum(len(i) for i in idx) < self.batch_size:
            epoch, offset = divmod(start, n)
            take = min(self.batch_size - sum(len(i) for i in idx), n - offset)
            idx.append(self._perm(epoch)[offset : offset + take])
            start += take
        return torch.cat(idx)

    def iterate(self, start_step: int) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def sample(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + 1_000_003)
        return self.x[torch.randperm(len(self.x), generator=g)[:n]]

    def fingerprint(self) -> dict[str, Any]:
        """The tensor's identity (``tensor_fingerprint``) and the batching (size, seed)."""
        return {
            "kind": "tensor",
            **tensor_fingerprint(self.x),
            "batch_size": self.batch_size,
            "seed": self.seed,
        }


def tensor_fingerprint(x: Tensor) -> dict[str, Any]:
    """Shape, dtype and a sha256 of ``x``'s bytes: of the whole tensor up to ``FULL_HASH_BYTES``,
    else of ``SAMPLED_ROWS`` evenly strided rows (and the last row), which is cheap and still
    catches a different file, order or scaling."""
    rows = x.detach()
    hashed = "all"
    if rows.dim() > 0 and rows.numel() * rows.element_size() > FULL_HASH_BYTES:
        stride = math.ceil(len(rows) / SAMPLED_ROWS)
        rows = torch.cat([rows[::stride], rows[-1:]])
        hashed = f"rows [::{stride}] and the last"
    flat = rows.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return {
        "shape": list(x.shape),
        "dtype": str(x.dtype).removeprefix("torch."),
        "sha256": hashlib.sha256(flat).hexdigest(),
        "hashed": hashed,
    }


def data_fingerprint(data: BatchSource) -> dict[str, Any]:
    """What identifies the batches of ``data``, for the resume check.

    The source's own ``fingerprint()`` where it has one (``TensorBatches``); for the activation
    store's loader (``StoreBatches``, which has none) its manifest's shard checksums and its
    batching settings; for any other source only its type and ``d_in`` (a weaker check).
    """
    method = getattr(data, "fingerprint", None)
    if callable(method):
        return dict(method())
    manifest = getattr(getattr(data, "store", None), "manifest", None)
    if isinstance(manifest, dict) and "shards" in manifest:
        shard_sums = "\n".join(str(s.get("sha256")) for s in manifest["shards"])
        return {
            "kind": "activation_store",
            "d": manifest.get("d"),
            "dtype": manifest.get("dtype"),
            "n_tokens": manifest.get("n_tokens"),
            "shards": len(manifest["shards"]),
            "shards_sha256": hashlib.sha256(shard_sums.encode()).hexdigest(),
            **{
                name: getattr(data, name, None)
                for name in ("batch_size", "seed", "chunk_tokens", "buffer_tokens")
            },
        }
    return {"kind": f"{type(data).__module__}.{type(data).__qualname__}", "d_in": data.d_in}


@dataclass
class TrainConfig:
    architecture: str
    sae: dict[str, Any] = field(
        default_factory=dict
    )  # architecture hyperparameters (d_in filled in)
    steps: int = 1000
    batch_size: int = 4096
    lr: float = 1e-3
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.0  # decay linearly to 0 over this final fraction of steps
    grad_clip: float = 1.0  # max global gradient norm; <= 0 disables
    dead_after_tokens: int = 1_000_000
    checkpoint_every: int = 500
    log_every: int = 50
    init_sample: int = 8192  # tokens used by SAE.init_from_data
    normalize_activations: bool = False  # train on x * c with E||c x|| = sqrt(d_in)
    seed: int = 0
    device: str = "cpu"  # e.g. "cuda"; checkpoints and saved SAEs are always on the CPU
    # Also save the SAE after these fractions of the steps (``snapshots/<fraction>/``), e.g.
    # (0.5,): the half-budget SAE of the same run, for the settledness check of the claims.
    snapshot_fractions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "dead_after_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"train config: `{name}` must be a positive integer, got {value!r}"
                )
        warmup = self.lr_warmup_steps
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(
                f"train config: `lr_warmup_steps` must be a non-negative integer (0: no warm-up), "
                f"got {warmup!r}"
            )
        if not (_is_real(self.lr) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train config: `lr` must be a positive number, got {self.lr!r}")
        if not (_is_real(self.lr_decay_fraction) and 0.0 <= self.lr_decay_fraction <= 1.0):
            raise ValueError(
                f"train config: `lr_decay_fraction` must be in [0, 1], got {self.lr_decay_fraction}"
            )
        if not (_is_real(self.grad_clip) and math.isfinite(self.grad_clip)):
            raise ValueError(
                f"train config: `grad_clip` must be a finite number (the maximum gradient norm; "
                f"0 or less disables clipping), got {self.grad_clip!r}"
            )
        betas = tuple(self.adam_betas)
        if len(betas) != 2 or not all(_is_real(b) and 0.0 <= b < 1.0 for b in betas):
            raise ValueError(
                f"train config: `adam_betas` must be two numbers in [0, 1), such as (0.9, 0.999), "
                f"got {self.adam_betas!r}"
            )
        self.adam_betas = betas  # type: ignore[assignment]
        fractions = tuple(self.snapshot_fractions)
        if not all(_is_real(f) and 0.0 < f < 1.0 for f in fractions):
            raise ValueError(
                f"train config: `snapshot_fractions` must be numbers in (0, 1), such as (0.5,), "
                f"got {self.snapshot_fractions!r}"
            )
        self.snapshot_fractions = tuple(float(f) for f in fractions)  # type: ignore[assignment]
        resolve_device(self.device, key="device")  # hardware this machine lacks fails here


def _is_real(value: object) -> bool:
    """A real number (int, float, numpy scalar), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``lr_warmup_steps``, flat, then linear decay to 0 at the end."""
    factor = 1.0
    if cfg.lr_warmup_steps > 0:
        factor = min(factor, (step + 1) / cfg.lr_warmup_steps)
    decay_steps = int(cfg.lr_decay_fraction * cfg.steps)
    if decay_steps > 0:
        factor = min(factor, (cfg.steps - step) / decay_steps)
    return factor


def input_scale_for(sample: Tensor) -> float:
    """c = sqrt(d_in) / E||x||, so that the scaled activations have E||c x|| = sqrt(d_in)."""
    return float(math.sqrt(sample.shape[1]) / sample.norm(dim=1).mean().clamp_min(1e-12))


# --- checkpoints: safetensors + JSON, written atomically ------------------------------------------
def _optimizer_tensors(sae: SAE, opt: torch.optim.Adam) -> dict[str, Tensor]:
    out = {}
    for name, p in sae.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}::{key}"] = torch.as_tensor(value).detach().cpu().contiguous().clone()
    return out


def _load_optimizer_tensors(sae: SAE, opt: torch.optim.Adam, tensors: dict[str, Tensor]) -> None:
    """Restore Adam's state. Moments take the *strides* of their parameter, not just its shape and
    device: fused Adam walks parameter, gradient and moments as flat memory, so a contiguous moment
    beside a transposed parameter (``W_enc`` is stored as the transpose of a (d_sae, d_in) block)
    would be updated element-for-wrong-element without any error. (Gradients from ``backward``
    already follow their parameter's strides: autograd's layout contract.)"""
    fused = bool(opt.defaults.get("fused"))
    for name, p in sae.named_parameters():
        state = {
            key.split("::", 1)[1]: v for key, v in tensors.items() if key.split("::", 1)[0] == name
        }
        if not state:
            continue
        restored = {}
        for key, value in state.items():
            if key == "step":  # on the CPU for plain Adam, beside the parameter for fused Adam
                restored[key] = value.to(p.device) if fused else value
            else:
                restored[key] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(
                    value
                )
        opt.state[p] = restored


def save_checkpoint(
    out_dir: Path,
    sae: SAE,
    opt: torch.optim.Adam,
    step: int,
    tokens_since_fired: Tensor,
    *,
    meta: dict[str, Any] | None = None,
) -> None:
    """Write ``out_dir/checkpoint`` (weights, Adam state, counters, ``trainer_state.json`` with
    ``step`` and ``meta``) without ever leaving no complete copy: the new checkpoint is written to
    ``checkpoint.tmp`` (its JSON last, marking it complete), the old one is renamed to
    ``checkpoint.old``, the new one into place, then the old one is removed. A kill between the
    renames leaves both copies, and ``recover_checkpoint`` picks the newest complete one."""
    final, tmp = out_dir / CHECKPOINT_DIR, out_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save(tmp)
    state = _optimizer_tensors(sae, opt)
    state["__tokens_since_fired"] = tokens_since_fired.clone()
    save_file(state, str(tmp / "trainer_state.safetensors"))
    (tmp / TRAINER_STATE_JSON).write_text(json.dumps({"step": step, **(meta or {})}) + "\n")
    old = out_dir / (CHECKPOINT_DIR + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _is_complete_checkpoint(path: Path) -> bool:
    """All files present and the JSON (written last) readable with a step."""
    files = ("config.json", "sae.safetensors", "trainer_state.safetensors", TRAINER_STATE_JSON)
    if not all((path / name).is_file() for name in files):
        return False
    try:
        return isinstance(json.loads((path / TRAINER_STATE_JSON).read_text()).get("step"), int)
    except (OSError, ValueError, AttributeError):
        return False


def recover_checkpoint(out_dir: Path) -> Path | None:
    """``out_dir/checkpoint`` if there is one to resume from, else ``None``.

    A run killed inside ``save_checkpoint`` between its two renames leaves no ``checkpoint`` but
    ``checkpoint.old`` and ``checkpoint.tmp``: the complete ``.tmp`` is the newest state, else
    ``.old`` is the previous one; it is renamed back to ``checkpoint``. Nothing is deleted here.
    """
    final = out_dir / CHECKPOINT_DIR
    if final.exists():
        return final
    for suffix in (".tmp", ".old"):
        leftover = out_dir / (CHECKPOINT_DIR + suffix)
        if leftover.is_dir() and _is_complete_checkpoint(leftover):
            leftover.rename(final)
            warnings.warn(
                f"{final} was missing (a run was stopped while saving it); recovered it from the "
                f"complete copy in {leftover.name}",
                stacklevel=3,
            )
            return final
    return None


def _damaged(ckpt: Path, detail: object) -> CheckpointError:
    return CheckpointError(
        f"checkpoint in {ckpt} is damaged ({detail}); rerun with --no-resume (resume=False) to "
        f"start over, or use another --out"
    )


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json`` of the checkpoint ``ckpt``: step and, since the settings check, the
    run's ``config`` and ``data`` identity. ``CheckpointError`` if it is missing or unreadable."""
    try:
        state = json.loads((ckpt / TRAINER_STATE_JSON).read_text())
    except (OSError, ValueError) as err:
        raise _damaged(ckpt, f"{TRAINER_STATE_JSON}: {err}") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(ckpt, f"{TRAINER_STATE_JSON} has no integer `step`")
    return state


_MISSING = object()


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, odd objects their ``str``)."""
    return json.loads(json.dumps(value, default=str))


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _show(value: Any) -> str:
    return "(not set)" if value is _MISSING else json.dumps(value)


def resume_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every result-changing setting that differs between a checkpoint's ``trainer_state.json``
    (``saved``) and this run (``current``: ``config`` and ``data``), as ``key: old vs new``."""
    diffs = []
    for section, prefix in (("config", ""), ("data", "data.")):
        old = _flatten(saved.get(section) or {})
        new = _flatten(_jsonable(current[section]))
        for key in sorted(old.keys() | new.keys()):
            if section == "config" and key in RESULT_NEUTRAL:
                continue
            a, b = old.get(key, _MISSING), new.get(key, _MISSING)
            if a != b:
                diffs.append(f"{prefix}{key}: {_show(a)} in the checkpoint, {_show(b)} in this run")
    return diffs


def check_resumable(ckpt: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` naming every differing setting unless ``saved`` (the
    checkpoint's state) matches this run; warn for checkpoints that predate the check."""
    if "config" not in saved:
        warnings.warn(
            f"{ckpt} predates the settings check (it does not record the run's settings or "
            "data); resuming without comparing them. Pass --no-resume to start over instead.",
            stacklevel=3,
        )
        return
    diffs = resume_differences(saved, current)
    if diffs:
        listing = "".join(f"\n  {line}" for line in diffs)
        raise CheckpointError(
            f"cannot resume from {ckpt} (step {saved['step']}): this run's settings differ from "
            f"those that wrote it:{listing}\nPass --no-resume (resume=False), or delete {ckpt}, "
            "to start over, or use another --out."
        )


def load_checkpoint(out_dir: Path, sae: SAE, opt: torch.optim.Adam) -> tuple[int, Tensor]:
    """Load ``out_dir/checkpoint`` into ``sae`` and ``opt``; return (step, tokens_since_fired).

    ``CheckpointError`` if it was written for another SAE or is damaged (unreadable files, wrong
    shapes, or non-finite weights from before the trainer refused to write them)."""
    ckpt = out_dir / CHECKPOINT_DIR
    step = read_trainer_state(ckpt)["step"]
    readable = (OSError, ValueError, TypeError, KeyError, RuntimeError, SafetensorError)
    try:
        saved = SAE.load(ckpt)
    except readable as err:
        raise _damaged(ckpt, err) from err
    if saved.name != sae.name or saved.cfg != sae.cfg:
        raise CheckpointError(
            f"Checkpoint {ckpt} was written for {saved.name} with {saved.cfg}, "
            f"but this run asks for {sae.name} with {sae.cfg}. Pass --no-resume (resume=False), "
            f"or delete {ckpt}, to start over, or use another --out."
        )
    try:
        sae.load_state_dict(saved.state_dict())  # copies onto the device of sae's parameters
        state = load_file(str(ckpt / "trainer_state.safetensors"))
        tokens_since_fired = state.pop("__tokens_since_fired")
        _load_optimizer_tensors(sae, opt, state)
    except readable as err:
        raise _damaged(ckpt, f"trainer_state.safetensors: {err}") from err
    bad = nonfinite_tensors(sae, opt)
    if bad:
        raise _damaged(ckpt, f"non-finite values in {', '.join(bad)}")
    return step, tokens_since_fired


def nonfinite_tensors(sae: SAE, opt: torch.optim.Adam) -> list[str]:
    """Names of the SAE's floating tensors (parameters, buffers) and Adam states with NaN/Inf."""
    tensors = [(name, t) for name, t in sae.state_dict().items()]
    for name, p in sae.named_parameters():
        tensors += [(f"{name}::{key}", v) for key, v in opt.state.get(p, {}).items()]
    return [
        name
        for name, t in tensors
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


# --- the loop ------------------------------------------------------------------------------
def make_optimizer(sae: SAE, cfg: TrainConfig) -> torch.optim.Adam:
    """Adam over the SAE's parameters, fused (one kernel per parameter instead of about eight
    elementwise passes) on the devices where PyTorch has the fused kernel."""
    device = next(sae.parameters()).device
    fused = True if device.type in ("cpu", "cuda") else None
    return torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas, fused=fused)


def train_step(
    sae: SAE,
    opt: torch.optim.Adam,
    x: Tensor,
    step: int,
    cfg: TrainConfig,
    tokens_since_fired: Tensor,
    *,
    dist: DistContext | None = None,
) -> LossOutput:
    """One training step on the batch ``x`` (already in the SAE's units, on its device).

    Sets the learning rate of ``step`` (``lr_factor``), computes ``sae.loss_with_sparse_code``
    with the current dead-latent mask, backward, ``before_step``, gradient-norm clipping, Adam,
    ``after_step``, and updates ``tokens_since_fired`` in place (+batch for every latent, 0 for
    those that fired). Returns the loss output; its ``z`` may be sparse (see ``code_stats``).
    Raises ``TrainingDiverged`` before touching the weights or Adam's state if the loss or the
    gradient norm is not finite.

    ``dist`` (a multi-process run): ``x`` is this rank's slice of the global batch; the gradients
    are averaged across ranks before ``before_step`` (so the clipping, the finiteness check and the
    update see the global gradient and agree on every rank), the loss check is agreed by all
    ranks, and ``tokens_since_fired`` counts the global batch and the latents fired on any rank.
    """
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    dead_mask = tokens_since_fired >= cfg.dead_after_tokens
    ctx = TrainContext(step=step, total_steps=cfg.steps, dead_mask=dead_mask)
    out = sae.loss_with_sparse_code(x, ctx)
    if dist is None:
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(f"{cfg.architecture}: loss is {out.loss.item()} at step {step}.")
    elif not distributed.all_true(torch.isfinite(out.loss), dist, x.device):
        raise TrainingDiverged(
            f"{cfg.architecture}: loss is not finite on some rank at step {step} "
            f"(rank {dist.rank}: {out.loss.item()})."
        )
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    distributed.all_reduce_grads(sae, dist)
    sae.before_step()
    if cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    else:  # the same norm, without scaling anything
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in sae.parameters() if p.grad is not None]
        )
    if not torch.isfinite(grad_norm):
        raise TrainingDiverged(
            f"{cfg.architecture}: gradient norm is {grad_norm.item()} at step {step} "
            f"(loss {out.loss.item():.6g})."
        )
    opt.step()
    sae.after_step()
    with torch.no_grad():
        fired, _ = code_stats(out.z)
        if dist is None:
            tokens_since_fired += x.shape[0]
            tokens_since_fired[fired] = 0
        else:
            _count_global(tokens_since_fired, fired, x.shape[0], dist)
    return out


def _count_global(
    tokens_since_fired: Tensor, fired: Tensor, local_rows: int, dist: DistContext
) -> None:
    """Update the dead-latent counters with the global batch: ``local_rows`` rows on each rank,
    and a latent fired if it fired on any rank (MAX of the ranks' fired masks)."""
    mask = torch.zeros_like(tokens_since_fired, dtype=torch.int32)
    mask[fired] = 1
    distributed.all_reduce_(mask, dist, op="max")
    tokens_since_fired += local_rows * dist.world_size
    tokens_since_fired[mask.bool()] = 0


def _rewind_live(live_dir: Path, step: int) -> None:
    """Drop the dvclive rows logged after ``step`` (by a run stopped after its last checkpoint),
    so that the resumed run, which logs them again, leaves the same rows as an uninterrupted run;
    the summary (``metrics.json``) takes the last rows kept."""
    metrics_dir = live_dir / "plots" / "metrics"
    summary: dict[str, Any] = {}
    for tsv in sorted(metrics_dir.rglob("*.tsv")):
        lines = tsv.read_text().splitlines(keepends=True)
        columns = lines[0].rstrip("\r\n").split("\t") if lines else []
        if "step" not in columns:
            continue
        at = columns.index("step")
        kept = [row for row in lines[1:] if _row_step(row, at) <= step]
        tsv.write_text(lines[0] + "".join(kept))
        if kept:
            *parents, leaf = tsv.relative_to(metrics_dir).with_suffix("").parts
            node = summary
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = _number(kept[-1].rstrip("\r\n").split("\t")[-1])
    if (live_dir / "metrics.json").exists():
        (live_dir / "metrics.json").write_text(json.dumps({**summary, "step": step}, indent=4))


def _row_step(row: str, at: int) -> float:
    """The step of a tsv row; infinite (so dropped) for a row cut short by a kill."""
    try:
        return int(row.split("\t")[at])
    except (IndexError, ValueError):
        return math.inf


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _open_live(live_dir: str | Path, start: int, cfg: TrainConfig) -> Any:
    """A dvclive ``Live`` in ``live_dir``: fresh for a new run, continued (without the rows
    logged after the checkpoint) for a resumed one; the run's settings logged as params."""
    from dvclive import Live

    if start > 0:
        _rewind_live(Path(live_dir), start)
    live = Live(str(live_dir), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
    live.log_params(
        {
            "architecture": cfg.architecture,
            **{k: v for k, v in asdict(cfg).items() if k != "sae"},
            **cfg.sae,
        }
    )
    return live


def snapshot_steps(cfg: TrainConfig) -> dict[int, float]:
    """``{step: fraction}``: the SAE is saved once ``step`` steps are done (at least one)."""
    return {max(1, round(f * cfg.steps)): f for f in cfg.snapshot_fractions}


def snapshot_dir(out_dir: str | Path, fraction: float) -> Path:
    """Where ``train`` saves the SAE after ``fraction`` of the steps: ``snapshots/<fraction>``."""
    return Path(out_dir) / SNAPSHOT_DIR / f"{fraction:g}"


def _diverged(err: TrainingDiverged, out_dir: Path, saved_step: int | None) -> TrainingDiverged:
    """``err`` with where the run's last good checkpoint is, if it has one."""
    ckpt = out_dir / CHECKPOINT_DIR
    if saved_step is None:
        where = f"No checkpoint was written by this run, so none is left in {ckpt}"
    else:
        where = f"The last good checkpoint, at step {saved_step}, is intact in {ckpt}"
    return TrainingDiverged(f"{err} {where}; lower `lr` or check the data.")


def train(
    cfg: TrainConfig,
    data: BatchSource,
    out_dir: str | Path,
    *,
    resume: bool = True,
    live_dir: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> SAE:
    """Train ``cfg.architecture`` on ``data``; write ``out_dir/sae`` and return the SAE.

    ``resume``: continue from ``out_dir/checkpoint`` (or the copy a kill during its writing left,
    see ``recover_checkpoint``) if it exists and was written with the same settings and data, else
    ``CheckpointError`` says what differs. ``stop_after``: stop (with a checkpoint) after this
    many steps, to simulate an interruption. ``live_dir``: dvclive folder.

    ``dist``: a multi-process (data-parallel) run, by default the initialised process group if it
    has more than one process (see ``common.distributed``). ``cfg.batch_size`` is then the global
    batch; each rank trains on its slice of it, and rank 0 alone writes checkpoints, logs and the
    final SAE (the others wait for it). Without one, the single-process path runs unchanged.
    """
    out_dir = Path(out_dir)
    if dist is None:
        dist = distributed.current()
    if dist is not None:
        _check_distributable(cfg, dist)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {"config": _jsonable(asdict(cfg)), "data": _jsonable(data_fingerprint(data))}
    if dist is None:
        ckpt = recover_checkpoint(out_dir) if resume else None
    else:
        ckpt = _shared_checkpoint(out_dir, resume, dist)
    if ckpt is not None:
        check_resumable(ckpt, read_trainer_state(ckpt), identity)
    torch.manual_seed(cfg.seed)
    sample = data.sample(cfg.init_sample)
    sae_kwargs = {"seed": cfg.seed, **cfg.sae, "d_in": data.d_in}
    if cfg.normalize_activations:
        sae_kwargs["input_scale"] = input_scale_for(sample)
    device = torch.device(cfg.device) if dist is None else dist.device_for(cfg.device)
    sae = build_sae(cfg.architecture, **sae_kwargs).to(device)
    opt = make_optimizer(sae, cfg)
    tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    start, saved_step = 0, None
    if ckpt is not None:
        start, tokens_since_fired = load_checkpoint(out_dir, sae, opt)
        tokens_since_fired = tokens_since_fired.to(device)
        saved_step = start
    else:
        sae.init_from_data(sae.scale_in(sample.to(device)))
    if dist is not None:
        _check_same_start(start, dist, device, out_dir)
    distributed.broadcast_module(sae, dist)  # every rank starts from rank 0's weights

    main = dist is None or dist.is_main
    live = None if live_dir is None or not main else _open_live(live_dir, start, cfg)
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc=f"train {cfg.architecture}",
        disable=not (progress and main),
    )
    batches = data.iterate(start) if dist is None else _rank_batches(data, start, dist)
    snapshots = snapshot_steps(cfg)
    try:
        for step in range(start, end):
            x = sae.scale_in(next(batches).to(device, non_blocking=True))
            out = train_step(sae, opt, x, step, cfg, tokens_since_fired, dist=dist)
            # logged rows depend only on the step, so that a resumed run logs the same rows
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                with torch.no_grad():
                    metrics = {
                        "loss": out.loss.item(),
                        "fvu": fvu(x, out.x_hat).item(),
                        "l0": code_stats(out.z)[1].item(),
                        "dead_fraction": (tokens_since_fired >= cfg.dead_after_tokens)
                        .float()
                        .mean()
                        .item(),
                    }
                if dist is not None:
                    metrics = _mean_over_ranks(metrics, dist, device)
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
                if live is not None:
                    live.step = step + 1  # the row's step: the number of steps done
                    for k, v in {**metrics, **out.terms}.items():
                        live.log_metric(f"train/{k}", v)
                    live.next_step()
            if step + 1 in snapshots:
                _check_finite(sae, opt, cfg, step)
                if main:
                    sae.save(snapshot_dir(out_dir, snapshots[step + 1]))
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                _check_finite(sae, opt, cfg, step)
                if main:
                    save_checkpoint(out_dir, sae, opt, step + 1, tokens_since_fired, meta=identity)
                distributed.barrier(dist)
                saved_step = step + 1
            bar.update(1)
        if end == cfg.steps:
            _check_finite(sae, opt, cfg, end - 1)
    except TrainingDiverged as err:
        raise _diverged(err, out_dir, saved_step) from None
    finally:
        bar.close()
    if live is not None:
        live.end()
    if end == cfg.steps:
        sae.eval()
        if main:
            sae.save(out_dir / FINAL_DIR)
        distributed.barrier(dist)
    return sae


# --- several processes (see common.distributed) ---------------------------------------------
# Architectures whose loss is a mean of per-token terms, so that averaging the ranks' gradients
# over equal slices gives the one-process gradient of the global batch (to float rounding).
# The others couple the tokens of a batch (BatchTopK's batch threshold, Matryoshka's, switch
# load balancing, ...) and would train differently on slices; they are refused for now.
DISTRIBUTED_ARCHITECTURES = frozenset({"relu", "topk"})


def _check_distributable(cfg: TrainConfig, dist: DistContext) -> None:
    """``ValueError`` for a run that cannot be split over ``dist.world_size`` processes."""
    if cfg.architecture not in DISTRIBUTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {cfg.architecture!r} is not supported across processes yet (its loss "
            f"or state depends on the whole batch); supported: "
            f"{', '.join(sorted(DISTRIBUTED_ARCHITECTURES))}. Train it in one process."
        )
    distributed.slice_for(cfg.batch_size, dist.rank, dist.world_size)  # divisibility
    if cfg.architecture == "topk" and cfg.sae.get("aux_normalize", True) and dist.is_main:
        warnings.warn(
            "topk with aux_normalize: the AuxK loss is normalised by each rank's slice of the "
            "batch, so once latents die the run differs slightly from a one-process run "
            "(aux_normalize=false makes it a per-token mean)",
            stacklevel=3,
        )


def _shared_checkpoint(out_dir: Path, resume: bool, dist: DistContext) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 recovers it (``recover_checkpoint`` may
    rename a leftover copy), then the others look once it is done."""
    if not resume:
        return None
    if dist.is_main:
        recover_checkpoint(out_dir)
    distributed.barrier(dist)
    final = out_dir / CHECKPOINT_DIR
    return final if final.exists() else None


def _check_same_start(start: int, dist: DistContext, device: torch.device, out_dir: Path) -> None:
    """``ValueError`` on every rank unless all resume from the same step (a checkpoint that only
    some ranks see: ``out_dir`` not on a filesystem shared by every node)."""
    bounds = torch.tensor([start, -start], dtype=torch.long, device=device)
    distributed.all_reduce_(bounds, dist, op="max")
    latest, earliest = int(bounds[0]), -int(bounds[1])
    if latest != earliest:
        raise ValueError(
            f"the ranks would resume from different steps ({earliest} to {latest}): the checkpoint "
            f"in {out_dir / CHECKPOINT_DIR} is not the same for every process; put --out on a "
            f"filesystem that every node sees"
        )


def _rank_batches(data: BatchSource, start_step: int, dist: DistContext) -> Iterator[Tensor]:
    """This rank's slices of the global batches from ``start_step`` on: the source's own
    ``rank_batch(step, rank, world_size)`` where it has one (it reads only those rows), else the
    rows of each whole batch from ``iterate``."""
    method = getattr(data, "rank_batch", None)
    if callable(method):
        step = start_step
        while True:
            yield method(step, dist.rank, dist.world_size)
            step += 1
    for batch in data.iterate(start_step):
        yield batch[distributed.slice_for(len(batch), dist.rank, dist.world_size)]


def _mean_over_ranks(
    metrics: dict[str, float], dist: DistContext, device: torch.device
) -> dict[str, float]:
    """The ranks' mean of each logged metric (the FVU is thus a mean of per-slice ratios)."""
    values = torch.tensor(list(metrics.values()), dtype=torch.float64, device=device)
    distributed.all_reduce_(values, dist, op="sum")
    return dict(zip(metrics, (values / dist.world_size).tolist(), strict=True))


def _check_finite(sae: SAE, opt: torch.optim.Adam, cfg: TrainConfig, step: int) -> None:
    """``TrainingDiverged`` if a weight or Adam state is NaN/Inf after ``step``, before saving."""
    bad = nonfinite_tensors(sae, opt)
    if bad:
        raise TrainingDiverged(
            f"{cfg.architecture}: non-finite values in {', '.join(bad)} after step {step}."
        )


# --- command line ---------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _extra_hyperparameters(extra: list[str]) -> dict[str, Any]:
    """Hyperparameters from leftover ``--name value`` flags, as DVC unpacks a params dict.

    ``--name v`` -> v; ``--name v1 v2`` -> [v1, v2]; ``--name`` -> True; ``--no-name`` -> False
    (DVC's ``parsing.bool: boolean_optional`` and ``parsing.list: nargs``, see .dvc/config).
    """
    hyper: dict[str, Any] = {}
    key: str | None = None
    values: list[Any] = []

    def flush() -> None:
        if key is None:
            return
        if values:
            hyper[key] = values[0] if len(values) == 1 else list(values)
        elif key.startswith("no_"):
            hyper[key[3:]] = False
        else:
            hyper[key] = True

    for token in extra:
        if token.startswith("--"):
            flush()
            key, values = token[2:].replace("-", "_"), []
        elif key is None:
            raise SystemExit(
                f"error: unexpected argument {token!r}; hyperparameters go as --name value"
            )
        else:
            values.append(_parse_value(token))
    flush()
    return hyper


def main(argv: list[str] | None = None) -> None:
    from common.activations.files import load_activation_file

    p = argparse.ArgumentParser(
        allow_abbrev=False,  # `--k 32` is a hyperparameter, not an abbreviation of --key
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any other `--name value` pair is an SAE hyperparameter (e.g. --k 32 --d_sae 4096).",
    )
    p.add_argument(
        "--data", required=True, help=".npy / .safetensors (N x d) or an activation store folder"
    )
    p.add_argument(
        "--key", default=None, help="tensor name inside a multi-tensor .safetensors file"
    )
    p.add_argument(
        "--arch", "--architecture", dest="arch", required=True, help="e.g. relu, topk, gated"
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="SAE hyperparameter"
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint/, sae/, live/)")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--snapshot-fractions",
        type=lambda text: tuple(float(f) for f in text.split(",") if f.strip()),
        default=(),
        help="also save the SAE after these fractions of the steps, e.g. 0.5 (snapshots/0.5/)",
    )
    skip = ("architecture", "sae", "adam_betas", "snapshot_fractions")
    for name, f in TrainConfig.__dataclass_fields__.items():
        if name in skip:
            continue
        flags = ["--" + name.replace("_", "-"), "--" + name]
        if isinstance(f.default, bool):  # --flag, --flag true|false, --no-flag
            p.add_argument(
                *flags, dest=name, type=_parse_bool, nargs="?", const=True, default=f.default
            )
            p.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false")
        else:
            p.add_argument(*flags, dest=name, type=type(f.default), default=f.default)
    args, extra = p.parse_known_args(argv)
    hyper = _extra_hyperparameters(extra)
    for item in args.set:
        if "=" not in item:
            p.error(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        hyper[key] = _parse_value(value)
    train_kwargs = {k: getattr(args, k) for k in TrainConfig.__dataclass_fields__ if k not in skip}
    train_kwargs["snapshot_fractions"] = args.snapshot_fractions
    dist = None
    try:
        cfg = TrainConfig(architecture=args.arch, sae=hyper, **train_kwargs)
        dist = distributed.init_from_env(cfg.device)
        data_path = Path(args.data)
        if data_path.is_dir():
            from common.activations.store import ActivationStore  # the sharded store

            data: BatchSource = ActivationStore(data_path).batches(cfg.batch_size, seed=cfg.seed)
        else:
            x = load_activation_file(data_path, key=args.key)
            data = TensorBatches(x, cfg.batch_size, seed=cfg.seed)
        out = Path(args.out)
        train(
            cfg,
            data,
            out,
            resume=not args.no_resume,
            live_dir=out / "live",
            progress=not args.quiet,
            dist=dist,
        )
    except (ValueError, TypeError, FileNotFoundError, KeyError, TrainingDiverged) as err:
        raise SystemExit(f"error: {err}") from err
    finally:
        distributed.shutdown(dist)
    if dist is None or dist.is_main:
        print(f"saved {out / FINAL_DIR}")


if __name__ == "__main__":
    main()
