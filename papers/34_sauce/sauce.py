"""Selective concept unlearning with SAE features (paper 34: SAUCE, ICCV 2025; selection of 17).

SAUCE trains a vanilla SAE on a vision encoder's activations x,

    z = ReLU(W_enc^T (x - b_dec) + b_enc),   x_hat = W_dec^T z + b_dec,
    L = ||x - x_hat||^2 + alpha ||z||_1,

and scores every feature i for a concept c with SAeUron's selection score (Cywinski & Deja,
ICML 2025, paper 17) on a positive set D_c (images of c) and a negative set D_nc (the rest):

    S(i, c) = mu(i, D_c) / (sum_j mu(j, D_c) + delta) - mu(i, D_nc) / (sum_j mu(j, D_nc) + delta),

with mu(i, D) the mean activation of feature i over D. The top-k features F_c are kept. At
inference the activation is replaced by the decoded, edited code

    z_i <- gamma z_i  for i in F_c  (gamma negative),   x' = W_dec^T z' + b_dec,

and, here, the SAE's error term x - x_hat is added back (x' = x + W_dec^T (z' - z)), so that an
empty edit leaves the activation unchanged. Unlearning is measured by classifiers: unlearning
accuracy UA = 1 - P(pred in C | y in C) on the target concept's images, in-domain retention IRA
(accuracy on the other classes of the same dataset) and cross-domain retention CRA (accuracy on
the other dataset).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from common.sae import SAE

# Abstract concepts: sets of Fashion-MNIST class indices (t-shirt 0, trouser 1, pullover 2,
# dress 3, coat 4, sandal 5, shirt 6, sneaker 7, bag 8, ankle boot 9).
ABSTRACT_CONCEPTS: dict[str, tuple[int, ...]] = {
    "footwear": (5, 7, 9),
    "upper-body garment": (0, 2, 4, 6),
}


@dataclass(frozen=True)
class Concept:
    """A concept to unlearn: a set of classes of one dataset (one class: a concrete concept)."""

    name: str
    dataset: str
    classes: tuple[int, ...]

    @property
    def abstract(self) -> bool:
        return len(self.classes) > 1


@torch.no_grad()
def sae_codes(sae: SAE, x: Tensor, batch_size: int = 4096) -> Tensor:
    """SAE code z (N, d_sae) of raw activations x (N, d), encoded in chunks."""
    sae.eval()
    parts = [sae.encode(sae.scale_in(chunk)) for chunk in x.split(batch_size)]
    return torch.cat(parts) if parts else x.new_zeros(0, sae.cfg.d_sae)


@torch.no_grad()
def sae_reconstruction(sae: SAE, z: Tensor) -> Tensor:
    """x_hat = W_dec^T z + b_dec in raw activation units."""
    return sae.scale_out(sae.decode(z))


def decoder_matrix(sae: SAE) -> Tensor:
    """The (d_sae, d) decoder rows in the SAE's training units (tied SAEs: the encoder^T)."""
    weight = getattr(sae, "decoder_weight", None)
    return weight if weight is not None else sae.decoder_directions


def selection_scores(
    z: Tensor, positive: Tensor, negative: Tensor | None = None, delta: float = 1e-6
) -> Tensor:
    """SAeUron / SAUCE score S(i, c) for every feature i, shape (d_sae,).

    S(i,c) = mu(i,D_c)/(sum_j mu(j,D_c) + delta) - mu(i,D_nc)/(sum_j mu(j,D_nc) + delta), with
    D_c the rows of ``z`` where ``positive`` is true and D_nc those where ``negative`` is true
    (default: every row not in D_c).
    """
    positive = positive.bool()
    negative = ~positive if negative is None else negative.bool()
    for name, mask in (("positive", positive), ("negative", negative)):
        if mask.shape != (z.shape[0],):
            raise ValueError(f"{name} must be a mask of shape ({z.shape[0]},), got {mask.shape}")
    if not positive.any() or not negative.any():
        raise ValueError("the positive set D_c and the negative set D_nc must both be non-empty")
    if (positive & negative).any():
        raise ValueError("the positive and negative sets overlap")
    mu_c = z[positive].mean(0)
    mu_nc = z[negative].mean(0)
    return mu_c / (mu_c.sum() + delta) - mu_nc / (mu_nc.sum() + delta)


def top_features(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest-scoring features (ties broken by index, largest score first)."""
    if k <= 0 or k > scores.numel():
        raise ValueError(f"k must be in [1, {scores.numel()}], got {k}")
    order = np.lexsort((np.arange(scores.numel()), -scores.detach().cpu().numpy()))
    return torch.from_numpy(order[:k].copy())


def random_features(candidates: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k features drawn without replacement from ``candidates`` (the control of the same size)."""
    if k > len(candidates):
        raise ValueError(f"cannot draw {k} random features from {len(candidates)} candidates")
    return candidates[torch.randperm(len(candidates), generator=generator)[:k]]


@torch.no_grad()
def edit_delta(sae: SAE, z: Tensor, features: Tensor, gamma: float) -> Tensor:
    """Change of the decoded activation when z_i <- gamma z_i for i in ``features`` (raw units).

    The decoder is affine, so decode(z') - decode(z) = sum_{i in F} (gamma - 1) z_i W_dec[i]
    (divided by the SAE's input scale): only the k selected rows are touched.
    """
    w = decoder_matrix(sae)[features]  # (k, d)
    delta = ((gamma - 1.0) * z[:, features]) @ w
    return sae.scale_out(delta)


@torch.no_grad()
def edited_activations(
    sae: SAE,
    x: Tensor,
    z: Tensor,
    features: Tensor,
    gamma: float,
    *,
    keep_error: bool = True,
    x_hat: Tensor | None = None,
) -> Tensor:
    """x' after the SAUCE edit of ``features`` by ``gamma``.

    keep_error=True:  x' = x + decode(z') - decode(z)   (the SAE error term x - x_hat is kept)
    keep_error=False: x' = decode(z')                    (the activation replaced by the SAE's)
    """
    delta = edit_delta(sae, z, features, gamma)
    if keep_error:
        return x + delta
    base = sae_reconstruction(sae, z) if x_hat is None else x_hat
    return base + delta


def unlearning_scores(
    pred: np.ndarray, labels: np.ndarray, classes: Sequence[int]
) -> dict[str, float]:
    """UA and in-domain retention from predictions on one dataset's test images.

    ua  = 1 - P(pred in C | y in C)    (for one class: 1 - accuracy on the target class)
    ira = P(pred = y | y not in C)     (accuracy on the non-target classes)
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    target = np.isin(labels, list(classes))
    if not target.any() or target.all():
        raise ValueError(f"classes {list(classes)} must cover some but not all test labels")
    recognised = np.isin(pred[target], list(classes)).mean()
    return {
        "ua": float(1.0 - recognised),
        "ira": float((pred[~target] == labels[~target]).mean()),
    }


def multi_unlearning_scores(
    pred: np.ndarray, labels: np.ndarray, classes: Sequence[int]
) -> dict[str, float]:
    """UA and in-domain retention when several concepts (``classes``) are unlearned at once.

        ua  = mean over c in classes of 1 - P(pred = c | y = c)
        ira = P(pred = y | y not in classes)

    Each concept must go on its own: a sandal called "sneaker" counts as a forgotten sandal.
    """
    pred, labels = np.asarray(pred), np.asarray(labels)
    uas = [unlearning_scores(pred, labels, (c,))["ua"] for c in classes]
    return {"ua": float(np.mean(uas)), "ira": unlearning_scores(pred, labels, classes)["ira"]}


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of correct predictions (the cross-domain retention CRA on the other dataset)."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(labels) else float("nan")


@torch.no_grad()
def zero_shot_predict(clip, x: Tensor, weights: Tensor) -> np.ndarray:
    """CLIP zero-shot prediction argmax_c <e_I(x), w_c> from pooled tower features x (N, 1280)."""
    emb = clip.project_image_features(x.to(weights.device))
    return (emb @ weights.T).argmax(1).cpu().numpy()


def fit_probe(x: Tensor, y: Tensor, c: float = 0.1, seed: int = 0):
    """Multinomial logistic regression on standardised features (the "classifier")."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500, random_state=seed))
    clf.fit(x.numpy(), y.numpy())
    return clf


@dataclass
class AffineReadout:
    """A classifier whose prediction is argmax_c (x A + b)_c on raw features x (N, d).

    Both read-outs are affine up to the argmax: the probe's logits are
    ((x - m) / s) C^T + c0, and CLIP's zero-shot scores normalize(W_I (x - mu) / sigma) w_c^T have
    the argmax of W_I ((x - mu) / sigma) w_c^T (normalising a row by a positive number keeps its
    argmax). So the scores of an edited x' = x + sum_{i in F} (gamma - 1) z_i W_dec[i] are the
    original scores plus sum_{i in F} (gamma - 1) z_i (W_dec[i] A): one (d_sae, classes) table
    ``feature_scores`` per SAE makes every edit cheap.
    """

    weight: Tensor  # A (d, classes)
    bias: Tensor  # b (classes,)

    def scores(self, x: Tensor) -> Tensor:
        return x.float() @ self.weight + self.bias

    def predict(self, x: Tensor) -> np.ndarray:
        return self.scores(x).argmax(1).numpy()

    def feature_scores(self, sae: SAE) -> Tensor:
        """(d_sae, classes): the score change per unit of each SAE feature, W_dec[i] A / scale."""
        return sae.scale_out(decoder_matrix(sae).detach()) @ self.weight


def probe_readout(clf) -> AffineReadout:
    """The affine form of a StandardScaler + LogisticRegression pipeline (``fit_probe``)."""
    scaler, lr = clf[0], clf[-1]
    coef = torch.as_tensor(lr.coef_, dtype=torch.float32)  # (classes, d)
    mean = torch.as_tensor(scaler.mean_, dtype=torch.float32)
    scale = torch.as_tensor(scaler.scale_, dtype=torch.float32)
    weight = (coef / scale).T
    bias = torch.as_tensor(lr.intercept_, dtype=torch.float32) - (mean / scale) @ coef.T
    return AffineReadout(weight.contiguous(), bias)


@torch.no_grad()
def zero_shot_readout(clip, class_weights: Tensor) -> AffineReadout:
    """The argmax-equivalent affine form of CLIP-style zero-shot classification (bias-free head)."""
    proj = clip.image_proj.weight.float()  # (D, d)
    mean, std = clip.image_mean.float(), clip.image_std.float()
    weight = (proj / std).T @ class_weights.float().T  # (d, classes)
    bias = -((mean / std) @ proj.T) @ class_weights.float().T
    if getattr(clip.image_proj, "bias", None) is not None:
        bias = bias + clip.image_proj.bias.float() @ class_weights.float().T
    return AffineReadout(weight.contiguous(), bias)


def edited_predictions(
    base_scores: Tensor, z: Tensor, feature_scores: Tensor, features: Tensor, gamma: float
) -> np.ndarray:
    """argmax of the scores after z_i <- gamma z_i for i in ``features``, via the affine read-out.

    scores(x') = scores(x) + sum_{i in F} (gamma - 1) z_i feature_scores[i]; ``base_scores`` are
    those of x (error term kept) or of x_hat (activation replaced by the SAE's reconstruction).
    """
    change = ((gamma - 1.0) * z[:, features]) @ feature_scores[features]
    return (base_scores + change).argmax(1).numpy()


def top_activating(z: Tensor, feature: int, n: int) -> Tensor:
    """Indices of the n rows of z with the largest activation of ``feature`` (only those > 0)."""
    values, idx = z[:, feature].topk(min(n, len(z)))
    return idx[values > 0]


# --- a weight-update baseline ---------------------------------------------------------------
def finetune_probe(
    clf,
    x_forget: Tensor,
    y_forget: Tensor,
    x_retain: Tensor,
    y_retain: Tensor,
    classes: Sequence[int],
    *,
    retain_weight: float,
    lr: float,
    max_steps: int,
    stop_ua: float,
) -> tuple[AffineReadout, int]:
    """Unlearning by updating the probe's weights (the baseline SAUCE compares with).

    The logistic-regression head of ``clf`` (``fit_probe``), on its standardised features, is
    trained by Adam on  -CE(forget) + retain_weight * CE(retain):  gradient ascent on the forget
    set (``retain_weight=0``, "GA") or gradient difference ("GD", descent on the retain set too),
    full batch, until the forget set's (training) unlearning accuracy reaches ``stop_ua`` (the
    share of its images no longer predicted in ``classes``) or ``max_steps``. Returns the edited
    head as an ``AffineReadout`` on raw features and the number of steps taken.
    """
    scaler, head = clf[0], clf[-1]
    mean = torch.as_tensor(scaler.mean_, dtype=torch.float32)
    scale = torch.as_tensor(scaler.scale_, dtype=torch.float32)
    xf, xr = (x_forget.float() - mean) / scale, (x_retain.float() - mean) / scale
    w = torch.tensor(head.coef_, dtype=torch.float32, requires_grad=True)
    b = torch.tensor(head.intercept_, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    in_concept = torch.as_tensor(list(classes))
    step = 0
    for step in range(max_steps + 1):
        logits_f = xf @ w.T + b
        with torch.no_grad():
            ua = 1.0 - torch.isin(logits_f.argmax(1), in_concept).float().mean().item()
        if ua >= stop_ua or step == max_steps:
            break
        loss = -torch.nn.functional.cross_entropy(logits_f, y_forget.long())
        if retain_weight:
            retain = torch.nn.functional.cross_entropy(xr @ w.T + b, y_retain.long())
            loss = loss + retain_weight * retain
        opt.zero_grad()
        loss.backward()
        opt.step()
    w, b = w.detach(), b.detach()
    weight = (w / scale).T.contiguous()
    bias = b - (mean / scale) @ w.T
    return AffineReadout(weight, bias), step


def unlearning_quality(ua: float, ira: float, cra: float) -> float:
    """One number for an unlearning edit: the mean of UA, IRA and CRA (ours; the paper reports an
    "unlearning quality" without a formula we could check). 1 is perfect forgetting with nothing
    else lost."""
    return (ua + ira + cra) / 3.0


# --- the notebook's steps ------------------------------------------------------------------------
def concept_sets(
    concept: Concept, train_labels: dict[str, Tensor], negatives: str
) -> tuple[Tensor, Tensor]:
    """D_c and D_nc as masks over the concatenated training images of the datasets (in the order
    of ``train_labels``): D_nc is every other image (``negatives="all"``) or only those of the
    concept's own dataset (``"same_domain"``)."""
    pos, neg = [], []
    for name, y in train_labels.items():
        if name == concept.dataset:
            is_c = torch.isin(y, torch.tensor(concept.classes))
            pos.append(is_c)
            neg.append(~is_c)
        else:
            pos.append(torch.zeros_like(y, dtype=torch.bool))
            neg.append(torch.full_like(y, negatives == "all", dtype=torch.bool))
    return torch.cat(pos), torch.cat(neg)


def seed_metrics(
    seed: int,
    grid,
    recon,
    baseline,
    originals: dict,
    concepts: Sequence[Concept],
    *,
    metric_cols: Sequence[str],
    k_main: int,
    gamma_main: float,
    other_negatives: str,
    d_sae: int,
    weight_update=None,
    multi=None,
) -> dict:
    """One seed's metrics: the SAE, the spliced accuracies, every concept at the operating point
    and the sweep over the concrete concepts, and under ``derived`` the means the claims compare
    (every concrete concept, the Fashion-MNIST ones, the digits, the abstract ones); the
    unlearning quality (``unlearning_quality``, probe) of SAUCE, of no edit and of the
    weight-update baselines (``weight_update``: one row per concrete concept and method, GA / GD;
    ``quality_probe_weight_update`` is the better method's), and the multi-concept edits
    (``multi``: one row per seed, concept set and method, ``*_multi``)."""

    def means(frame) -> dict[str, float]:
        return {c: float(frame[c].mean()) for c in metric_cols}

    g = grid[grid.seed == seed]
    at = g[(g.k == k_main) & (g.gamma == gamma_main)]
    rec = recon[recon.seed == seed].set_index("dataset")
    bl = baseline[(baseline.seed == seed) & (baseline.variant == "SAE spliced")]
    edits = ("SAUCE", "random", "SAUCE, no error term", f"SAUCE, {other_negatives} negatives")
    out = {
        "sae": {
            "d_sae": d_sae,
            "l0": float(rec.l0.mean()),
            "alive_fraction": float(rec.alive.iloc[0]),
            "train_seconds": float(rec.train_seconds.iloc[0]),
        }
        | {f"fvu_{n.replace('-', '_')}": float(rec.loc[n, "fvu"]) for n in rec.index},
        "spliced_accuracy": {
            f"{r.readout}_{r.dataset.replace('-', '_')}": float(r.accuracy) for r in bl.itertuples()
        },
        "per_concept": {
            c.name: {m: means(at[(at.concept == c.name) & (at.method == m)]) for m in edits}
            | {"no edit": originals[c.name]}
            for c in concepts
        },
        "sweep": [
            {"method": m, "k": int(k), "gamma": float(gm)} | means(sub)
            for (m, k, gm), sub in g[g.method.isin(["SAUCE", "random"]) & ~g.abstract].groupby(
                ["method", "k", "gamma"]
            )
        ],
    }
    derived = {}
    domain = g.concept.map({c.name: c.dataset for c in concepts})
    groups = {  # concept groups the claims average over
        "": ~g.abstract,  # every concrete concept
        "_fashion": ~g.abstract & (domain == "fashion-mnist"),
        "_digits": ~g.abstract & (domain == "digits"),
        "_abstract": g.abstract,
    }
    suffixes = ("", "_random", "_no_error", f"_{other_negatives}_negatives")
    for kind, mask in groups.items():
        if not mask.any():
            continue
        for method, suffix in (*zip(edits, suffixes), ("no edit", "_original")):
            sub = g[mask & (g.method == method)]
            if method != "no edit":
                sub = sub[(sub.k == k_main) & (sub.gamma == gamma_main)]
            derived |= {f"{c}{kind}{suffix}": v for c, v in means(sub).items()}
    concrete_at = at[~at.abstract & (at.method == "SAUCE")]
    derived["min_ua_probe"] = float(concrete_at.ua_probe.min())
    derived["share_concepts_ua_probe_over_0_9"] = float((concrete_at.ua_probe > 0.9).mean())

    def quality(frame) -> float:
        scores = [
            unlearning_quality(r.ua_probe, r.ira_probe, r.cra_probe) for r in frame.itertuples()
        ]
        return float(np.mean(scores))

    derived["quality_probe"] = quality(concrete_at)
    derived["quality_probe_original"] = quality(g[~g.abstract & (g.method == "no edit")])
    if weight_update is not None:
        per_method = {m: quality(f) for m, f in weight_update.groupby("method")}
        for m, f in weight_update.groupby("method"):
            key = m.lower()
            derived[f"quality_probe_{key}"] = per_method[m]
            derived |= {f"{c}_probe_{key}": float(f[f"{c}_probe"].mean()) for c in ("ua", "ira")}
        derived["quality_probe_weight_update"] = max(per_method.values())
    if multi is not None:
        mm = multi[multi.seed == seed]
        for method, suffix in (("SAUCE", "_multi"), ("no edit", "_multi_original")):
            sub = mm[mm.method == method]
            derived |= {f"{c}{suffix}": float(sub[c].mean()) for c in metric_cols}
        out["multi_concept"] = [
            {k: (v if isinstance(v, str) else float(v)) for k, v in r.items() if k != "seed"}
            for r in mm.to_dict("records")
        ]
    out["derived"] = derived
    return out
