"""Ground-truth toy data: activations built from known features, so recovery can be measured.

Every generator returns a ``ToyData`` with ``x = codes @ features`` where ``features`` are unit-norm
rows (``n_features x d``) and ``codes`` are sparse and nonnegative (``n_samples x n_features``).
The constructions follow the toy models used in the literature:

* ``superposition``: independent features, each active with probability ``p_active`` and magnitude
  Uniform[0.5, 2): the sparse superposition of Elhage et al. (2022) and Sharkey et al. (2022).
* ``hierarchical``: parent/child features, a child only fires with its parent (the absorption setup
  of Chanin et al., 2025, paper 45; used by Matryoshka SAEs, paper 22).
* ``correlated``: features fire in correlated groups, with an exactly known expected L0.
* ``known_magnitudes``: every active feature has magnitude 1, so shrinkage (paper 2) is measurable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ToyData:
    x: Tensor  # (n_samples, d)
    features: Tensor  # (n_features, d), unit-norm rows
    codes: Tensor  # (n_samples, n_features), >= 0
    parents: Tensor | None = None  # (n_children,) parent index of each child feature, if any

    @property
    def true_l0(self) -> float:
        return (self.codes > 0).float().sum(1).mean().item()


def random_features(n_features: int, d: int, generator: torch.Generator) -> Tensor:
    """Random unit vectors in R^d (nearly orthogonal when d is large)."""
    f = torch.randn(n_features, d, generator=generator)
    return f / f.norm(dim=1, keepdim=True)


def _magnitudes(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator) * 1.5 + 0.5  # Uniform[0.5, 2)


def superposition(
    n_samples: int = 20_000,
    n_features: int = 64,
    d: int = 32,
    p_active: float = 0.05,
    seed: int = 0,
) -> ToyData:
    """Independent sparse features: c_j ~ Bernoulli(p) * Uniform[0.5, 2); x = c F."""
    g = torch.Generator().manual_seed(seed)
    features = random_features(n_features, d, g)
    active = torch.rand(n_samples, n_features, generator=g) < p_active
    codes = active * _magnitudes((n_samples, n_features), g)
    return ToyData(x=codes @ features, features=features, codes=codes)


def hierarchical(
    n_samples: int = 20_000,
    n_parents: int = 16,
    children_per_parent: int = 3,
    d: int = 48,
    p_parent: float = 0.08,
    p_child_given_parent: float = 0.4,
    seed: int = 0,
) -> ToyData:
    """Parent features with children that only fire together with their parent.

    Features are ordered parents first, then children; ``parents[k]`` gives the parent of child k.
    A child fires with probability ``p_child_given_parent`` when its parent fires, never otherwise,
    so an SAE can "absorb" the parent direction into the child latents.
    """
    g = torch.Generator().manual_seed(seed)
    n_children = n_parents * children_per_parent
    features = random_features(n_parents + n_children, d, g)
    parent_on = torch.rand(n_samples, n_parents, generator=g) < p_parent
    parents = torch.arange(n_parents).repeat_interleave(children_per_parent)
    child_on = (torch.rand(n_samples, n_children, generator=g) < p_child_given_parent) & parent_on[
        :, parents
    ]
    active = torch.cat([parent_on, child_on], dim=1)
    codes = active * _magnitudes((n_samples, n_parents + n_children), g)
    return ToyData(x=codes @ features, features=features, codes=codes, parents=parents)


def correlated(
    n_samples: int = 20_000,
    n_groups: int = 16,
    group_size: int = 4,
    d: int = 48,
    p_group: float = 0.1,
    p_member: float = 0.5,
    seed: int = 0,
) -> ToyData:
    """Features in correlated groups that switch on together.

    Expected L0 = n_groups * p_group * group_size * p_member, known exactly.
    """
    g = torch.Generator().manual_seed(seed)
    n_features = n_groups * group_size
    features = random_features(n_features, d, g)
    group_on = torch.rand(n_samples, n_groups, generator=g) < p_group
    member_on = torch.rand(n_samples, n_features, generator=g) < p_member
    active = group_on.repeat_interleave(group_size, dim=1) & member_on
    codes = active * _magnitudes((n_samples, n_features), g)
    return ToyData(x=codes @ features, features=features, codes=codes)


def known_magnitudes(
    n_samples: int = 20_000,
    n_features: int = 64,
    d: int = 32,
    p_active: float = 0.05,
    seed: int = 0,
) -> ToyData:
    """Independent features that fire with magnitude exactly 1: any shrinkage is the SAE's."""
    g = torch.Generator().manual_seed(seed)
    features = random_features(n_features, d, g)
    codes = (torch.rand(n_samples, n_features, generator=g) < p_active).float()
    return ToyData(x=codes @ features, features=features, codes=codes)


GENERATORS = {
    "superposition": superposition,
    "hierarchical": hierarchical,
    "correlated": correlated,
    "known_magnitudes": known_magnitudes,
}


def main(argv: list[str] | None = None) -> None:
    """Write a toy data set as safetensors: ``x``, ``x_eval`` (held out), ``features``, codes."""
    import argparse
    import inspect
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    p = argparse.ArgumentParser(description="Generate ground-truth toy activations.")
    p.add_argument("--generator", choices=sorted(GENERATORS), default="superposition")
    p.add_argument("--n-samples", type=int, default=20_000)
    p.add_argument("--n-features", type=int, default=None)
    p.add_argument("--d", type=int, default=None)
    p.add_argument("--p-active", type=float, default=None)
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    generator = GENERATORS[args.generator]
    accepted = inspect.signature(generator).parameters
    kwargs = {"n_samples": args.n_samples, "seed": args.seed}
    for name in ("n_features", "d", "p_active"):
        value = getattr(args, name)
        if value is not None:
            if name not in accepted:
                raise SystemExit(f"error: generator {args.generator!r} has no parameter {name!r}")
            kwargs[name] = value
    data = generator(**kwargs)
    n_eval = int(round(args.eval_fraction * args.n_samples))
    tensors = {
        "x": data.x[n_eval:].contiguous(),
        "x_eval": data.x[:n_eval].contiguous(),
        "features": data.features.contiguous(),
        "codes_eval": data.codes[:n_eval].contiguous(),
    }
    if data.parents is not None:
        tensors["parents"] = data.parents.contiguous()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # One metadata entry (JSON with sorted keys): safetensors writes a multi-key mapping in a
    # random order, which would change the file's bytes (and DVC's hash) on every run.
    settings = {"generator": args.generator, **{k: str(v) for k, v in kwargs.items()}}
    save_file(tensors, str(out), metadata={"toy": json.dumps(settings, sort_keys=True)})
    print(
        f"wrote {out}: {len(tensors['x'])} train / {n_eval} eval vectors, "
        f"true L0 {data.true_l0:.2f}"
    )


if __name__ == "__main__":
    main()
