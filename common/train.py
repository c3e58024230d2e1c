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
not change the result.

Command line (any architecture, on any ``N x d`` activation file)::

    python -m common.train --data acts.npy --arch topk --set d_sae=4096 --set k=32 \
        --steps 2000 --batch-size 4096 --out runs/topk
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from common.sae import SAE, TrainContext, build_sae
from common.sae.base import LossOutput, code_stats, fvu

CHECKPOINT_DIR = "checkpoint"
FINAL_DIR = "sae"


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is left untouched."""


class BatchSource(Protocol):
    """Anything that yields training batches deterministically from a given step on."""

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
        n, start = len(self.x), step * self.batch_size
        idx = []
        while sum(len(i) for i in idx) < self.batch_size:
            epoch, offset = divmod(start, n)
            take = min(self.batch_size - sum(len(i) for i in idx), n - offset)
            idx.append(self._perm(epoch)[offset : offset + take])
            start += take
        return self.x[torch.cat(idx)]

    def iterate(self, start_step: int) -> Iterator[Tensor]:
        step = start_step
        while True:
            yield self.batch(step)
            step += 1

    def sample(self, n: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + 1_000_003)
        return self.x[torch.randperm(len(self.x), generator=g)[:n]]


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

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "checkpoint_every", "log_every", "dead_after_tokens")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(
                    f"train config: `{name}` must be a positive integer, got {value!r}"
                )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train config: `lr` must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.lr_decay_fraction <= 1.0:
            raise ValueError(
                f"train config: `lr_decay_fraction` must be in [0, 1], got {self.lr_decay_fraction}"
            )
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]


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
    out_dir: Path, sae: SAE, opt: torch.optim.Adam, step: int, tokens_since_fired: Tensor
) -> None:
    final, tmp = out_dir / CHECKPOINT_DIR, out_dir / (CHECKPOINT_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    sae.save(tmp)
    state = _optimizer_tensors(sae, opt)
    state["__tokens_since_fired"] = tokens_since_fired.clone()
    save_file(state, str(tmp / "trainer_state.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}) + "\n")
    old = out_dir / (CHECKPOINT_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out_dir: Path, sae: SAE, opt: torch.optim.Adam) -> tuple[int, Tensor]:
    ckpt = out_dir / CHECKPOINT_DIR
    saved = SAE.load(ckpt)
    if saved.name != sae.name or saved.cfg != sae.cfg:
        raise ValueError(
            f"Checkpoint {ckpt} was written for {saved.name} with {saved.cfg}, "
            f"but this run asks for "
            f"{sae.name} with {sae.cfg}. Delete {ckpt} (or use another --out) to start afresh."
        )
    sae.load_state_dict(saved.state_dict())  # copies onto the device of sae's parameters
    state = load_file(str(ckpt / "trainer_state.safetensors"))
    tokens_since_fired = state.pop("__tokens_since_fired")
    _load_optimizer_tensors(sae, opt, state)
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    return step, tokens_since_fired


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
) -> LossOutput:
    """One training step on the batch ``x`` (already in the SAE's units, on its device).

    Sets the learning rate of ``step`` (``lr_factor``), computes ``sae.loss_with_sparse_code``
    with the current dead-latent mask, backward, ``before_step``, gradient-norm clipping, Adam,
    ``after_step``, and updates ``tokens_since_fired`` in place (+batch for every latent, 0 for
    those that fired). Returns the loss output; its ``z`` may be sparse (see ``code_stats``).
    Raises ``TrainingDiverged`` before touching the weights if the loss is not finite.
    """
    for group in opt.param_groups:
        group["lr"] = cfg.lr * lr_factor(step, cfg)
    dead_mask = tokens_since_fired >= cfg.dead_after_tokens
    ctx = TrainContext(step=step, total_steps=cfg.steps, dead_mask=dead_mask)
    out = sae.loss_with_sparse_code(x, ctx)
    if not torch.isfinite(out.loss):
        raise TrainingDiverged(f"{cfg.architecture}: loss is {out.loss.item()} at step {step}.")
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    sae.before_step()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
    opt.step()
    sae.after_step()
    with torch.no_grad():
        fired, _ = code_stats(out.z)
        tokens_since_fired += x.shape[0]
        tokens_since_fired[fired] = 0
    return out


def train(
    cfg: TrainConfig,
    data: BatchSource,
    out_dir: str | Path,
    *,
    resume: bool = True,
    live_dir: str | Path | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> SAE:
    """Train ``cfg.architecture`` on ``data``; write ``out_dir/sae`` and return the SAE.

    ``resume``: continue from ``out_dir/checkpoint`` if it exists. ``stop_after``: stop (with a
    checkpoint) after this many steps, to simulate an interruption. ``live_dir``: dvclive folder.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    sample = data.sample(cfg.init_sample)
    sae_kwargs = {"seed": cfg.seed, **cfg.sae, "d_in": data.d_in}
    if cfg.normalize_activations:
        sae_kwargs["input_scale"] = input_scale_for(sample)
    device = torch.device(cfg.device)
    sae = build_sae(cfg.architecture, **sae_kwargs).to(device)
    opt = make_optimizer(sae, cfg)
    tokens_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=device)
    start = 0
    if resume and (out_dir / CHECKPOINT_DIR).exists():
        start, tokens_since_fired = load_checkpoint(out_dir, sae, opt)
        tokens_since_fired = tokens_since_fired.to(device)
    else:
        sae.init_from_data(sae.scale_in(sample.to(device)))

    live = None
    if live_dir is not None:
        from dvclive import Live

        live = Live(str(live_dir), resume=start > 0, save_dvc_exp=False, dvcyaml=None)
        live.log_params(
            {
                "architecture": cfg.architecture,
                **{k: v for k, v in asdict(cfg).items() if k != "sae"},
                **cfg.sae,
            }
        )

    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    bar = tqdm(
        total=cfg.steps, initial=start, desc=f"train {cfg.architecture}", disable=not progress
    )
    batches = data.iterate(start)
    step = start
    for step in range(start, end):
        x = sae.scale_in(next(batches).to(device, non_blocking=True))
        try:
            out = train_step(sae, opt, x, step, cfg, tokens_since_fired)
        except TrainingDiverged as err:
            bar.close()
            raise TrainingDiverged(
                f"{err} The last good checkpoint in {out_dir / CHECKPOINT_DIR} is intact; "
                "lower `lr` or check the data."
            ) from None
        if (step + 1) % cfg.log_every == 0 or step + 1 == end:
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
            bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()})
            if live is not None:
                for k, v in {**metrics, **out.terms}.items():
                    live.log_metric(f"train/{k}", v)
                live.step = step + 1
                live.next_step()
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(out_dir, sae, opt, step + 1, tokens_since_fired)
        bar.update(1)
    bar.close()
    if live is not None:
        live.end()
    if end == cfg.steps:
        sae.eval()
        sae.save(out_dir / FINAL_DIR)
    return sae


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
    skip = ("architecture", "sae", "adam_betas")
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
    try:
        cfg = TrainConfig(architecture=args.arch, sae=hyper, **train_kwargs)
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
        )
    except (ValueError, TypeError, FileNotFoundError, KeyError, TrainingDiverged) as err:
        raise SystemExit(f"error: {err}") from err
    print(f"saved {out / FINAL_DIR}")


if __name__ == "__main__":
    main()
