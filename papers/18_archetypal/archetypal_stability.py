"""Stability and plausibility of SAE dictionaries (paper 18: Fel et al., ICML 2025, Archetypal SAE).

Fel et al. constrain every atom of an SAE dictionary to the convex hull of the data,

    D = W C,   W >= 0,  W 1 = 1,   C = archetypes (k-means centroids of the data)      (A-SAE)
    D = W C + Lambda,   ||Lambda_i|| <= delta                                           (RA-SAE)

(implemented in ``common/sae/archetypal.py``), and measure

* **stability**: the mean cosine of the atoms of two runs after the best one-to-one matching
  (Hungarian algorithm, ``common.evals.stability``),

      S(D, D') = max_{P in Perm} (1/n) sum_i cos(D_i, D'_{P(i)}),

  between runs that differ in their initialisation (seed) or in their training data (subsets);
* **plausibility**: whether atoms are directions the data or the model actually uses. The paper's
  benchmark is the cosine of each true classification direction w_c with its best atom,
  mean_c max_i cos(D_i, w_c); its geometric argument is that hull-constrained atoms are mixtures
  of real data points. We also score that argument directly: each atom's cosine with its nearest
  data point, with its projection onto the cone of data points (nonnegative least squares), and
  the share of its mass that is negative (the features here are nonnegative, so any atom in their
  hull or cone has none).

This module holds the small pieces the notebook needs; training goes through ``common.train``.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from common.evals.evaluate import encode_decode
from common.sae import SAE
from common.train import TensorBatches, TrainConfig, train


# --- pairs of runs and data subsets --------------------------------------------------------------
def cyclic_pairs(keys: Sequence[Hashable]) -> list[tuple[Hashable, Hashable]]:
    """Pairs (k_i, k_{i+1 mod n}): each run takes part in two pairs, every pair once for n <= 3.

    One pair per seed, so that a per-seed claim compares independent-enough numbers.
    """
    keys = list(keys)
    if len(keys) < 2:
        raise ValueError(f"stability needs at least two runs, got {len(keys)}")
    if len(keys) == 2:
        return [(keys[0], keys[1])]
    return [(keys[i], keys[(i + 1) % len(keys)]) for i in range(len(keys))]


def disjoint_halves(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A random split of ``range(n)`` into two disjoint halves (sorted indices), drawn from seed."""
    if n < 2:
        raise ValueError(f"cannot split {n} points into two non-empty halves")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    half = n // 2
    return perm[:half].sort().values, perm[half : 2 * half].sort().values


# --- training ------------------------------------------------------------------------------------
def train_with_init(
    cfg: TrainConfig, x: Tensor, data_seed: int, out_dir: str | Path | None = None
) -> tuple[SAE, Tensor]:
    """Train ``cfg`` on ``x`` with ``common.train``; return the SAE and its dictionary after step 1.

    The run stops after one step (writing a checkpoint) and resumes to the end, which gives the
    same final weights as an uninterrupted run (``common.train``'s resume guarantee); the
    dictionary after the first step is the initial one up to one optimizer step, so that the
    stability of two runs *at initialisation* can be compared with their stability at the end
    (the "stability vs stabilisation" distinction). ``data_seed`` orders the batches.
    """
    batches = TensorBatches(x, cfg.batch_size, data_seed)
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(out_dir) if out_dir is not None else Path(tmp)
        first = train(cfg, batches, where, resume=False, stop_after=1, progress=False)
        init = first.decoder_directions.detach().clone()
        sae = train(cfg, batches, where, resume=True, progress=False)
    return sae.eval(), init


def codes_and_reconstruction(sae: SAE, x: Tensor, batch_size: int = 2048) -> tuple[Tensor, Tensor]:
    """``(z, x_hat)`` of raw features ``x`` (N, d): z in SAE units, x_hat in raw units."""
    return encode_decode(sae, x, batch_size)


# --- stability -----------------------------------------------------------------------------------
def unit_rows(d: Tensor) -> Tensor:
    """Rows scaled to unit norm (zero rows stay zero)."""
    d = d.detach().double()
    return d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)


def matched_atoms(first: Tensor, second: Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, cos)``: the Hungarian matching that maximises sum_i cos(D_i, D'_{P(i)}).

    The same matching as ``common.evals.stability.matched_cosines``, with the atom indices kept
    (to show the top images of matched atoms). Rows are sorted.
    """
    if first.ndim != 2 or second.ndim != 2 or first.shape[1] != second.shape[1]:
        raise ValueError(
            f"need two (n_atoms, d) dictionaries of the same d, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}"
        )
    cos = (unit_rows(first) @ unit_rows(second).T).cpu().numpy()
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return rows, cols, cos[rows, cols]


def remove_direction(atoms: Tensor, direction: Tensor) -> Tensor:
    """D_i - <D_i, u> u with u = direction / ||direction||: the atoms without their mean part.

    For uncentred data (here: nonnegative CNN features), every atom in the data's hull shares the
    mean direction, so any two such atoms already have a large cosine; stability after removing
    the mean direction asks whether the *rest* of the atoms agree.
    """
    u = direction.to(atoms.dtype) / direction.norm().clamp_min(1e-12)
    return atoms - (atoms @ u)[:, None] * u


# --- plausibility --------------------------------------------------------------------------------
def nearest_data_cosine(atoms: Tensor, points: Tensor) -> Tensor:
    """max_n cos(D_i, x_n) per atom: how close each atom's direction is to some real data point."""
    return (unit_rows(atoms) @ unit_rows(points).T).max(1).values.float()


def negative_mass(atoms: Tensor) -> Tensor:
    """sum_j max(-D_ij, 0) / sum_j |D_ij| per atom: 0 in the cone of nonnegative data."""
    d = atoms.detach().double()
    return (d.clamp(max=0).abs().sum(1) / d.abs().sum(1).clamp_min(1e-12)).float()


def cone_cosine(atoms: Tensor, points: Tensor, iterations: int = 300) -> Tensor:
    """cos(D_i, P^T w_i*) with w_i* = argmin_{w >= 0} ||D_i/||D_i|| - P^T w||^2, per atom.

    The cosine of each unit atom with its projection onto the cone spanned by the data points P
    (nonnegative least squares, solved by accelerated projected gradient on the Gram matrix
    G = P P^T with step 1 / lambda_max(G)). 1 when the atom is a nonnegative mix of data points,
    which A-SAE atoms are by construction (up to P being held-out points, not the archetypes).
    """
    a = unit_rows(atoms)
    p = points.detach().double()
    gram = p @ p.T
    b = a @ p.T  # <a_i, p_n>
    step = 1.0 / torch.linalg.eigvalsh(gram).max().clamp_min(1e-12)
    w = torch.zeros_like(b)
    y, t = w.clone(), 1.0
    for _ in range(iterations):
        w_next = (y - step * (y @ gram - b)).clamp(min=0)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = w_next + ((t - 1) / t_next) * (w_next - w)
        w, t = w_next, t_next
    proj = w @ p
    cos = (a * proj).sum(1) / proj.norm(dim=1).clamp_min(1e-12)
    return cos.float()


def ridge_directions(x: Tensor, labels: Tensor, n_classes: int, alpha: float = 1.0) -> Tensor:
    """Class directions of a ridge classifier: W = (X_c^T X_c + alpha N I)^{-1} X_c^T (Y - mean Y).

    Rows w_c (n_classes, d) are linear "true classification directions" on the features (the
    paper's plausibility benchmark uses the model's own classifier head; these features have none,
    so a linear probe on them stands in). X_c are the centred features.
    """
    x = x.double()
    xc = x - x.mean(0)
    y = torch.nn.functional.one_hot(labels.long(), n_classes).double()
    y = y - y.mean(0)
    a = xc.T @ xc + alpha * len(x) * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(a, xc.T @ y).T.float()


def probe_plausibility(atoms: Tensor, directions: Tensor) -> float:
    """mean_c max_i cos(D_i, w_c): how well the best atom recovers each classification direction."""
    return float((unit_rows(directions) @ unit_rows(atoms).T).max(1).values.mean())


# --- non-SAE references ---------------------------------------------------------------------------
def nmf_dictionary(x: Tensor, n_components: int, seed: int, max_iter: int = 200) -> Tensor:
    """Rows of H in X ~ W H (W, H >= 0), sklearn NMF from a random start drawn from ``seed``."""
    import warnings

    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    if bool((x < 0).any()):
        raise ValueError("NMF needs nonnegative features")
    model = NMF(n_components, init="random", random_state=seed, max_iter=max_iter, solver="mu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x.float().numpy())
    return torch.as_tensor(model.components_, dtype=torch.float32)


def kmeans_dictionary(x: Tensor, n_clusters: int, seed: int) -> Tensor:
    """Centroids of sklearn k-means (one k-means++ start drawn from ``seed``)."""
    from sklearn.cluster import KMeans

    model = KMeans(n_clusters, n_init=1, random_state=seed).fit(x.float().numpy())
    return torch.as_tensor(model.cluster_centers_, dtype=torch.float32)


def data_point_dictionary(x: Tensor, n_atoms: int, seed: int) -> Tensor:
    """``n_atoms`` random data points as a dictionary: the stability floor of the data's geometry.

    Two such dictionaries involve no learning at all; their matched cosine shows how much
    stability any set of atoms lying among uncentred data points gets for free.
    """
    if n_atoms > len(x):
        raise ValueError(f"asked for {n_atoms} data points as atoms, but there are {len(x)}")
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n_atoms]
    return x[idx].clone()


def top_images(codes: Tensor, atom: int, n: int) -> Tensor:
    """Indices of the ``n`` inputs with the largest activation of latent ``atom`` (active only)."""
    column = codes[:, atom]
    values, idx = column.topk(min(n, len(column)))
    return idx[values > 0]


def summary(values: Sequence[float] | Tensor) -> dict[str, Any]:
    """Mean / median / min / max of a list of numbers as plain floats (JSON-ready)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    return {
        "mean": float(v.mean()),
        "median": float(v.median()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


# --- the notebook's steps ------------------------------------------------------------------------
METHODS = ["topk", "archetypal", "ra"]  # the SAEs compared
REFERENCES = ["nmf", "kmeans", "data_points", "random"]  # dictionaries fitted without an SAE


@functools.cache
def efficientnet_tower(image_size: int) -> Any:
    """The frozen EfficientNet-Lite0 image tower at ``image_size`` px (loaded once)."""
    from common.models.clip_style import ImageTower
    from common.models.loading import load_model

    return ImageTower(load_model("efficientnet-lite0"), image_size)


def load_features(
    datasets: Sequence[str],
    split: str,
    n: int,
    n_cached: int,
    cache_dir: str | Path,
    image_size: int,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """The first ``n`` cached pooled features per dataset of ``split`` (the feature cache holds
    ``n_cached``), their global labels (dataset offset + class), the images at 28 px in [0, 1]
    and the number of labels. The features are EfficientNet-Lite0's at ``image_size`` px, whatever
    ``papers.clip`` names."""
    import torch.nn.functional as F

    from common.models.clip_style import shared_image_features

    tower = efficientnet_tower(image_size)

    if n > n_cached:
        raise ValueError(
            f"{split}: asked for {n} images per dataset but the train_clip_style stage caches "
            f"{n_cached}; lower it or raise clip_style.n_{split} and re-run that stage"
        )
    feats, labels, images, offset = [], [], [], 0
    for name in datasets:
        folder = Path(cache_dir) / f"{name}-{split}-{tower.image_size}px"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"no cached features at {folder}: run the train_clip_style stage first "
                "(dvc repro train_clip_style), which writes data/vision/image_features"
            )
        f, s = shared_image_features(
            name,
            split,
            n_cached,
            seed=0,
            cache_dir=cache_dir,
            image_size=tower.image_size,
            tower=tower,
            progress=False,
        )
        m = min(n, len(s))
        feats.append(f[:m])
        labels.append(s.labels[:m] + offset)
        images.append(F.interpolate(s.images[:m, None].float(), size=(28, 28))[:, 0] / 255)
        offset += len(s.class_names)
    return torch.cat(feats), torch.cat(labels), torch.cat(images), offset


def seed_metrics(seed: int, stab: Any, recon: Any, plaus: Any) -> dict[str, Any]:
    """One seed's metrics under ``derived``: the seed-variant and the subset-variant pair reported
    under ``seed`` (stability at the end, at initialisation, with the mean direction removed),
    and the reconstruction and plausibility of that seed's run."""
    derived: dict[str, Any] = {}
    for variant in ["seeds", "subsets"]:
        d = stab[(stab.variant == variant) & (stab.seed == seed)].set_index("method")
        derived[variant] = {
            "stability": {m: float(d.loc[m, "stability"]) for m in METHODS + REFERENCES},
            "stability_init": {m: float(d.loc[m, "at_init"]) for m in METHODS},
            "stability_mean_removed": {
                m: float(d.loc[m, "mean_removed"]) for m in METHODS + REFERENCES
            },
            "pair": str(d.loc["topk", "pair"]),
        }
    r = recon[recon.seed == seed].set_index("method")
    p = plaus[plaus.seed == seed].set_index("method")
    for col in ["fvu", "r2", "cosine", "l0", "alive_fraction", "train_seconds"]:
        derived[col] = {m: float(r.loc[m, col]) for m in METHODS}
    derived["plausibility"] = {
        col: {m: float(p.loc[m, col]) for m in p.index}
        for col in ["probe", "nearest_data_cosine", "cone_cosine", "negative_mass"]
    }
    return {"derived": derived}


def sae_hyper(method: str, p: Any) -> dict[str, Any]:
    """The hyperparameters of ``method`` (topk, archetypal, ra) from the paper's params ``p``."""
    sae: dict[str, Any] = {"d_sae": p.d_sae, "k": p.k}
    if method != "topk":
        sae |= {"n_candidates": p.n_candidates, "kmeans_iterations": p.kmeans_iterations}
    if method == "ra":
        sae["delta"] = p.ra_delta
    return sae


def reference_dictionaries(
    jobs: Sequence[tuple[str, Any, Tensor]], seed: int, d_sae: int, nmf_max_iter: int
) -> Mapping[tuple[str, str, Any], Tensor]:
    """NMF, k-means, random data points and random Gaussian atoms for each ``(variant, key, x)``
    job of ``seed``; data points and random atoms are a fresh draw per run."""
    out = {}
    for variant, key, x in jobs:
        out[(variant, "nmf", key)] = nmf_dictionary(x, d_sae, seed, nmf_max_iter)
        out[(variant, "kmeans", key)] = kmeans_dictionary(x, d_sae, seed)
        draw = 7919 * seed + (0 if variant == "seeds" else 101 + key[1])
        out[(variant, "data_points", key)] = data_point_dictionary(x, d_sae, draw)
        g = torch.Generator().manual_seed(draw)
        out[(variant, "random", key)] = torch.randn(d_sae, x.shape[1], generator=g)
    return out
