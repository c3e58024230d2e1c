"""Feature absorption on hierarchical toy data, where the true parent/child features are known.

Absorption (paper 45: Chanin et al., "A is for Absorption", NeurIPS 2025): a general latent (the
parent, "starts with S") fails to fire on tokens where a more specific latent (a child, "short")
fires, because the child latent has absorbed the parent direction. Chanin et al. detect it on LLMs
with first-letter probes; on toy data (``common.toy.hierarchical``) the parent is known exactly, so
we measure it directly.

For each parent feature p with true direction f_p and true code c_p(t) on token t:

    i*(p)     = argmax_i cos(d_i, f_p)               (the SAE latent that stands for p)
    cos(p)    = cos(d_{i*}, f_p)                     (parent recovery)
    r_p(t)    = z_{i*}(t) <d_{i*}, f_p> / (||d_{i*}|| c_p(t))
                (the fraction of the parent's true magnitude that its latent writes back)
    miss_p(t) = 1[r_p(t) < tau]                      (the latent is off or fires far too weakly)

    A_child(p) = mean of miss_p(t) over tokens with c_p(t) > 0 and some child of p active
    A_alone(p) = mean of miss_p(t) over tokens with c_p(t) > 0 and no child of p active
    absorption(p) = A_child(p) - A_alone(p)

``A_alone`` is the latent's ordinary false-negative rate; subtracting it leaves the extra misses
that happen only when a child is present, i.e. absorption. ``absorption`` is the mean over parents
(parents with no token in one of the two groups are skipped). ``tau`` defaults to 0.5: the latent
must reconstruct at least half of the parent's true magnitude to count as firing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.sae.base import SAE
from common.toy import ToyData


@torch.no_grad()
def encode_in_eval_mode(sae: SAE, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Codes of ``x`` with ``sae`` in eval mode (inference thresholds), batch by batch."""
    was_training = sae.training
    sae.eval()
    try:
        return torch.cat([sae.encode(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    finally:
        sae.train(was_training)


@torch.no_grad()
def per_parent_absorption(
    directions: Tensor, z: Tensor, data: ToyData, tau: float = 0.5
) -> dict[str, Tensor]:
    """Per-parent tensors (length n_parents), following the module docstring.

    Returns ``latent`` i*(p), ``cosine`` cos(p), ``miss_child`` A_child(p), ``miss_alone``
    A_alone(p) and ``absorption`` A_child - A_alone (NaN where a group of tokens is empty).
    ``directions``: (d_sae, d_in) decoder rows; ``z``: (n_samples, d_sae) codes of ``data.x``.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"`tau` (fraction of the parent magnitude) must be in (0, 1], got {tau}")
    if data.parents is None:
        raise ValueError(
            "absorption needs hierarchical toy data with `parents` (use common.toy.hierarchical)"
        )
    if z.shape != (data.x.shape[0], directions.shape[0]):
        raise ValueError(
            f"codes have shape {tuple(z.shape)}, expected (n_samples, d_sae) = "
            f"({data.x.shape[0]}, {directions.shape[0]}); encode data.x with the same SAE"
        )
    n_children = data.parents.numel()
    n_parents = data.features.shape[0] - n_children
    parent_dirs = data.features[:n_parents].float()
    parent_dirs = parent_dirs / parent_dirs.norm(dim=1, keepdim=True)
    norms = directions.float().norm(dim=1).clamp_min(1e-12)
    dots = parent_dirs @ directions.float().t()  # (n_parents, d_sae): <f_p, d_i>
    cosines, latent = (dots / norms).max(dim=1)
    parent_codes = data.codes[:, :n_parents]
    child_on = data.codes[:, n_parents:] > 0
    counts = torch.zeros(parent_codes.shape, dtype=torch.long).index_add_(
        1, data.parents, child_on.long()
    )
    any_child = counts > 0
    # parent component written back by latent i*: z_{i*} <d_{i*}, f_p> / ||d_{i*}||
    along_parent = dots.gather(1, latent[:, None]).squeeze(1) / norms[latent]
    captured = z[:, latent].float() * along_parent
    parent_on = parent_codes > 0
    ratio = captured / parent_codes.clamp_min(1e-12)
    miss = (ratio < tau) & parent_on
    with_child, alone = parent_on & any_child, parent_on & ~any_child
    miss_child = (miss & with_child).sum(0) / with_child.sum(0)  # NaN when empty
    miss_alone = (miss & alone).sum(0) / alone.sum(0)
    return {
        "latent": latent,
        "cosine": cosines,
        "miss_child": miss_child,
        "miss_alone": miss_alone,
        "absorption": miss_child - miss_alone,
    }


def absorption_metrics(
    sae: SAE, data: ToyData, tau: float = 0.5, batch_size: int = 4096
) -> dict[str, float]:
    """Mean over parents of the quantities above, encoding ``data.x`` in eval mode:
    ``absorption``, ``miss_child``, ``miss_alone`` and ``parent_cosine`` (mean cos(p))."""
    z = encode_in_eval_mode(sae, data.x, batch_size)
    per = per_parent_absorption(sae.decoder_directions.detach(), z, data, tau)
    return {
        "absorption": per["absorption"].nanmean().item(),
        "miss_child": per["miss_child"].nanmean().item(),
        "miss_alone": per["miss_alone"].nanmean().item(),
        "parent_cosine": per["cosine"].mean().item(),
    }
