"""The one interface every SAE architecture implements.

Conventions (shared by every file in this package, and by the SAELens on-disk format):

* ``x`` is a batch of activations, shape ``(batch, d_in)``, fp32.
* ``W_enc`` has shape ``(d_in, d_sae)``, ``W_dec`` has shape ``(d_sae, d_in)``: row ``i`` of
  ``W_dec`` is the direction of latent ``i``.
* ``b_dec`` (``b_pre`` in the papers) is subtracted before encoding and added after decoding.
* ``encode(x) -> z`` of shape ``(batch, d_sae)``, ``decode(z) -> x_hat``,
  ``forward(x) -> x_hat``, ``loss(x, ctx) -> LossOutput``.

The trainer (``common.train``) only talks to this interface: it calls ``init_from_data`` once on a
sample, ``loss_with_sparse_code`` (``loss`` unless overridden) every step, ``before_step`` between
backward and the optimizer step, ``after_step`` after every optimizer step (decoder-norm
constraints and other projections live there), and ``save`` / ``load`` for checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class SAEConfig:
    """Hyperparameters shared by every architecture; subclasses add their own fields."""

    d_in: int
    d_sae: int
    seed: int = 0
    # The SAE works on ``x * input_scale``. The trainer sets it when asked to normalise activations
    # so that E||x * input_scale|| = sqrt(d_in) (as SAELens's "expected_average_only_in"), which
    # makes sparsity coefficients comparable across models and sites. ``evaluate`` and the
    # downstream splice apply it; see ``SAE.scale_in`` / ``SAE.scale_out``.
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"SAE config: `{name}` must be a positive integer, got {value!r}")
        scale = self.input_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"SAE config: `input_scale` must be a positive number, got {scale!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TrainContext:
    """What the trainer tells ``SAE.loss`` about the current step."""

    step: int = 0
    total_steps: int = 1
    # Latents that have not fired for ``dead_after_tokens`` tokens (used by AuxK-style losses).
    dead_mask: Tensor | None = None


@dataclass
class LossOutput:
    """``loss`` is what the optimizer minimises; ``terms`` are detached scalars for logging."""

    loss: Tensor
    x_hat: Tensor
    z: Tensor
    terms: dict[str, float] = field(default_factory=dict)


class SAE(nn.Module):
    """Base class: subclasses set ``name`` and ``config_class`` and implement encode/decode/loss."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg

    # --- the interface -------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        raise NotImplementedError

    def loss_with_sparse_code(self, x: Tensor, ctx: TrainContext | None = None) -> LossOutput:
        """``loss``, but ``z`` may be a sparse COO tensor (the trainer reads firing and L0 from
        its entries, see ``code_stats``). Architectures with a k-sparse code override this to
        skip building a dense (batch, d_sae) ``z``; the default is ``loss``."""
        return self.loss(x, ctx)

    def scale_in(self, x: Tensor) -> Tensor:
        """Raw activations -> the units the SAE was trained in (``x * input_scale``)."""
        return x if self.cfg.input_scale == 1.0 else x * self.cfg.input_scale

    def scale_out(self, x_hat: Tensor) -> Tensor:
        """A reconstruction in the SAE's units -> raw activation units."""
        return x_hat if self.cfg.input_scale == 1.0 else x_hat / self.cfg.input_scale

    @torch.no_grad()
    def init_from_data(self, x: Tensor) -> None:
        """Data-dependent initialisation from a sample of activations (default: b_dec = mean)."""
        if hasattr(self, "b_dec"):
            self.b_dec.copy_(x.mean(0))

    @torch.no_grad()
    def before_step(self) -> None:
        """Gradient surgery between ``backward`` and ``optimizer.step`` (e.g. tangent steps)."""

    @torch.no_grad()
    def after_step(self) -> None:
        """Projection applied after every optimizer step (e.g. unit-norm decoder rows)."""

    @property
    def decoder_directions(self) -> Tensor:
        """``(d_sae, d_in)`` matrix of latent directions, for evaluation (ground-truth recovery)."""
        return self.W_dec  # type: ignore[return-value]

    # --- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``sae.safetensors`` and ``config.json`` (``{"architecture": ..., **cfg}``)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))
        config = {"architecture": self.name, **self.cfg.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> SAE:
        """Load any registered architecture from a directory written by ``save``.

        Everything is checked before the model is allocated: ``config.json`` is a JSON object
        naming an architecture, ``sae.safetensors`` is a complete safetensors file, and the
        tensor names and shapes in its header are those the config implies (read from a model
        built on the ``meta`` device, which allocates no memory). Errors are ValueError /
        FileNotFoundError naming the file and the fix.
        """
        from common.sae.registry import build_sae

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.exists():
                raise FileNotFoundError(
                    f"No SAE checkpoint at {directory}: missing {path.name}. "
                    "Train one with `python -m common.train` or check the path."
                )
        arch, config = _read_config(config_path)
        expected = _expected_shapes(arch, config, config_path)
        found = safetensors_shapes(weights_path)
        if expected is not None:
            _check_shapes(found, expected, f"{weights_path} does not match {config_path}")
        sae = build_sae(arch, **config)
        if expected is None:  # the architecture cannot be built on the meta device
            shapes = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
            _check_shapes(found, shapes, f"{weights_path} does not match {config_path}")
        sae.load_state_dict(load_file(str(weights_path)))
        return sae


_REFIT_HINT = "Retrain or re-export this SAE (SAE.save writes both files together)."


def _read_config(config_path: Path) -> tuple[str, dict[str, Any]]:
    """``(architecture, hyperparameters)`` from a ``config.json`` written by ``SAE.save``."""
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(
            f"{config_path} is not valid JSON ({err}): it is damaged or was not written by "
            f"SAE.save. {_REFIT_HINT}"
        ) from err
    if not isinstance(config, dict):
        raise ValueError(
            f"{config_path} must hold a JSON object of hyperparameters, got a "
            f"{type(config).__name__}. {_REFIT_HINT}"
        )
    arch = config.pop("architecture", None)
    if arch is None:
        raise ValueError(
            f"{config_path} has no `architecture` field; it was not written by SAE.save. "
            + _REFIT_HINT
        )
    return arch, config


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only (no tensor
    is loaded). A truncated or non-safetensors file is a ValueError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"{path} is not a readable safetensors file ({err}): it is truncated or in another "
            f"format (pickled checkpoints are never read). {_REFIT_HINT}"
        ) from err


def _expected_shapes(
    arch: str, config: dict[str, Any], config_path: Path
) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the state dict that ``config`` implies, from a model built on the ``meta``
    device (no memory); None if the architecture cannot be built there."""
    from common.sae.registry import build_sae

    try:
        with torch.device("meta"):
            model = build_sae(arch, **config)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_path}: {err}") from err
    except (NotImplementedError, RuntimeError):
        return None
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_shapes(
    found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], where: str
) -> None:
    """Same tensor names and shapes, or a ValueError listing every difference."""
    problems = [
        f"tensor {name} has shape {found[name]} in the file, the config implies {shape}"
        for name, shape in expected.items()
        if name in found and found[name] != shape
    ]
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if problems:
        raise ValueError(f"{where}: {'; '.join(problems)}. {_REFIT_HINT}")


def unit_norm_rows_(weight: Tensor, eps: float = 1e-8) -> None:
    """In place: ``W[i] <- W[i] / ||W[i]||`` (Cunningham et al. 2024; Bricken et al. 2023)."""
    weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(eps))


def remove_parallel_grad_(weight: Tensor, eps: float = 1e-8) -> None:
    """In place on ``weight.grad``: drop the component of each row's gradient along the row,

        g_i <- g_i - (<g_i, w_i> / max(||w_i||, eps)^2) w_i.

    With unit-norm decoder rows this keeps the optimizer step tangent to the sphere, so the
    renormalisation after the step changes the direction as little as possible. Two row-wise dot
    products and one fused multiply-add: no (d_sae, d_in) temporary.
    """
    grad = weight.grad
    if grad is None:
        return
    w = weight.detach()
    coef = torch.einsum("ij,ij->i", grad, w)
    coef.div_(torch.einsum("ij,ij->i", w, w).clamp_min_(eps * eps))
    grad.addcmul_(w, coef.unsqueeze(1), value=-1.0)


class UnitNormDecoderSAE(SAE):
    """An SAE whose decoder rows are kept at unit norm (Bricken et al. 2023; Gao et al. 2024):
    ``before_step`` makes the gradient of each row tangent to the sphere (``remove_parallel_grad_``)
    and ``after_step`` renormalises the rows (``unit_norm_rows_``).

    Subclasses whose constraint is optional override ``unit_norm_decoder``.
    """

    def unit_norm_decoder(self) -> nn.Parameter | None:
        """The ``(d_sae, d_in)`` decoder parameter held to unit-norm rows, or None if free."""
        return self.W_dec  # type: ignore[return-value]

    @torch.no_grad()
    def before_step(self) -> None:
        weight = self.unit_norm_decoder()
        if weight is not None:
            remove_parallel_grad_(weight)

    @torch.no_grad()
    def after_step(self) -> None:
        weight = self.unit_norm_decoder()
        if weight is not None:
            unit_norm_rows_(weight.data)


def code_stats(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(fired, l0)`` of a code ``z`` (batch, d_sae), dense or sparse COO: ``fired`` indexes the
    latents with a positive value on some token (a boolean mask, or latent indices for a sparse
    code), ``l0`` is the mean number of positive entries per token (a 0-d tensor).

    For a sparse code this reads only its entries, not a (batch, d_sae) matrix.
    """
    if z.is_sparse:
        positive = z._values() > 0  # entries need not be coalesced: a k-sparse code has no repeats
        return z._indices()[1][positive], positive.sum() / z.shape[0]
    positive = z > 0
    return positive.any(0), positive.sum(-1, dtype=z.dtype).mean()


def reconstruction_mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Per-token squared error summed over features, averaged over the batch: E||x - x_hat||^2."""
    return (x - x_hat).pow(2).sum(-1).mean()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: sum||x - x_hat||^2 / sum||x - mean(x)||^2."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
