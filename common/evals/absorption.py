"""First-letter feature absorption on an LM (paper 45: Chanin et al., "A is for Absorption").

Absorption: a general latent ("starts with S") stays silent on some tokens where the feature is
present (" short") because a more specific latent fires instead and writes the general direction
itself. Following SAEBench's absorption eval (paper 19; ``sae_bench/evals/absorption``):

1. Vocabulary: the tokenizer's single tokens that decode to a space and >= 2 ASCII letters
   (" apple", " Paris"); label = first letter, lower-cased. A seeded random subset of
   ``max_words`` is split into train and test words.
2. Activations: the site's activation at the word token of ``[BOS] + prefix + word`` where the
   prefix is a fixed in-context example list ("tree has the first letter: T" ...). The model is
   causal, so what follows the word in SAEBench's template does not change this activation.
3. Ground-truth probe: a multinomial logistic regression on the raw activations (train words)
   predicts the first letter; p_L = w_L / ||w_L|| is letter L's probe direction.
4. Main latents of L (k-sparse probing): rank latents by mean code on L-words minus mean code on
   the other train words; for k = 1 .. max_k fit a logistic regression on the top-k codes and take
   its test F1; k grows while F1 improves by more than ``f1_jump`` (0.03): the first k where it
   does not stops the search ("feature splitting" gives k > 1).
5. For each test word of letter L that the probe classifies correctly (the probe's true
   positives), with x its activation, z its codes, d_i the decoder rows:

       a        = <x, p_L>                                   (probe projection)
       c_i      = z_i <d_i, p_L>                             (latent i's share of it)
       main     = sum of c_i over the main latents
       absorb   = sum of the (at most 3) largest c_i > 0 among non-main latents with
                  cos(d_i, p_L) >= 0.1
       fraction = 0                                 if main >= a or absorb / a < 0.4 (or a <= 0)
                  1                                 elif main <= 0
                  m / (m + main), m = min(absorb, a - main)       otherwise
       full     = every main latent has z_i = 0, the non-main latent with the largest c_i has
                  cos(d_i, p_L) >= 0.025, a > 0, and its c_i / a >= 0.4

   Per letter: mean ``fraction`` and the rate of ``full`` over the probe's true positives.
   ``absorption_fraction`` / ``absorption_full_rate`` are their means over the evaluated letters
   (letters whose probe test F1 >= ``min_probe_f1``), SAEBench's ``mean_absorption_fraction_score``
   and ``mean_full_absorption_score``.

Cost: the prefix is the same for every word, so ``word_activations`` computes its keys and values
once and runs each word as a single token on top of them (equal to the full forward pass up to
float rounding); the probe of step 3 depends only on the activations, so
``fit_first_letter_probe`` can be fitted once and passed to ``absorption_from_activations`` for
every SAE evaluated on the same words. The SAE reads ``x * input_scale`` (``SAE.scale_in``).

Simplifications relative to SAEBench, all in the interest of CPU minutes:
* one fixed prefix of three in-context examples instead of up to 10 randomly drawn per word;
* the ground-truth probe is scikit-learn's multinomial logistic regression and "the probe says L"
  is its arg-max (SAEBench: 26 one-vs-rest probes trained with Adam, "says L" = logit > 0);
* latents are ranked by class-mean difference of their codes instead of by the weights of an
  L1-regularised probe on all codes;
* c_i = z_i <d_i, p_L> uses the decoder row as it is; SAEBench uses z_i cos(d_i, p_L). The two are
  equal for unit-norm decoder rows, and ours is the actual contribution when norms differ.
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from common import hooks
from common.evals.downstream import (
    bos_token_id,
    model_device,
    sequence_site,
    site_activations,
    unwrap_model,
)
from common.hooks import Site
from common.sae.base import SAE

LETTERS = "abcdefghijklmnopqrstuvwxyz"
DEFAULT_PREFIX = (
    "tree has the first letter: T\nhouse has the first letter: H\nwater has the first letter: W\n"
)
EPS = 1e-8


def first_letter_vocab(tokenizer: Any, min_letters: int = 2) -> tuple[list[int], list[str]]:
    """Token ids and words (leading space stripped) of the tokens " " + >= min_letters letters."""
    pattern = re.compile(rf" [A-Za-z]{{{min_letters},}}")
    ids, words = [], []
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        text = tokenizer.convert_tokens_to_string([token])
        if pattern.fullmatch(text):
            ids.append(int(token_id))
            words.append(text[1:])
    if not ids:
        raise ValueError("the tokenizer has no ' word' tokens (a space and letters) to probe")
    return ids, words


def _cache_keyword(net: nn.Module) -> str:
    """``cache`` in recent transformers (``past_key_values`` is deprecated there), else the old."""
    return "cache" if "cache" in inspect.signature(net.forward).parameters else "past_key_values"


def _prefix_cache(net: nn.Module, resolved: Site, head: Sequence[int]) -> Any | None:
    """Keys and values of ``head`` (the shared prefix), or None when the model keeps no cache.

    The forward pass stops at the site, so only the layers up to it are filled; that is all the
    word tokens need, since their forward pass stops there too.
    """
    try:
        from transformers import DynamicCache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    config = getattr(net, "config", None)
    if not getattr(config, "use_cache", False) or not getattr(config, "is_decoder", True):
        return None
    cache = DynamicCache(config=config)
    ids = torch.tensor([list(head)], device=model_device(net))
    try:
        hooks.run_until(
            net,
            [resolved],
            lambda: net(input_ids=ids, use_cache=True, **{_cache_keyword(net): cache}),
        )
    except (TypeError, ValueError, RuntimeError):  # a model whose forward takes no cache
        return None
    return cache if cache.get_seq_length() == len(head) else None


@torch.no_grad()
def _word_activations_cached(
    net: nn.Module, resolved: Site, cache: Any, token_ids: Sequence[int], batch_size: int
) -> Tensor:
    """The site's activation at one word token appended to the cached prefix, batch by batch."""
    device = model_device(net)
    out = []
    for start in range(0, len(token_ids), batch_size):
        words = torch.tensor(list(token_ids[start : start + batch_size]), dtype=torch.long)
        batch_cache = copy.deepcopy(cache)
        batch_cache.batch_repeat_interleave(len(words))
        ids = words[:, None].to(device)
        acts = hooks.run_until(
            net,
            [resolved],
            lambda: net(input_ids=ids, use_cache=True, **{_cache_keyword(net): batch_cache}),
        )[resolved.name]
        out.append(acts[:, -1].float().cpu())
    return torch.cat(out)


@torch.no_grad()
def word_activations(
    model: Any,
    site: str,
    tokenizer: Any,
    token_ids: Sequence[int],
    prefix: str = DEFAULT_PREFIX,
    batch_size: int = 64,
    reuse_prefix: bool = True,
) -> Tensor:
    """(n_words, d): the site's activation at the word token of [BOS] + prefix + word.

    Every word shares the same [BOS] + prefix, so with ``reuse_prefix`` (the default) its keys and
    values are computed once and each word costs one token's forward pass instead of the whole
    sequence's (~30x less compute with the default prefix). The result equals the full forward
    pass up to float rounding; ``reuse_prefix=False`` (or a model without a KV cache) runs it.
    """
    net = unwrap_model(model)
    resolved = sequence_site(net, site)
    bos = bos_token_id(tokenizer)
    head = ([] if bos is None else [bos]) + list(
        tokenizer(prefix, add_special_tokens=False)["input_ids"]
    )
    cache = _prefix_cache(net, resolved, head) if reuse_prefix and head else None
    if cache is not None:
        return _word_activations_cached(net, resolved, cache, token_ids, batch_size)
    out = []
    for start in range(0, len(token_ids), batch_size):
        words = torch.tensor(list(token_ids[start : start + batch_size]), dtype=torch.long)
        ids = torch.cat(
            [torch.tensor(head, dtype=torch.long).expand(len(words), -1), words[:, None]], 1
        )
        out.append(site_activations(net, resolved, ids)[:, -1].float().cpu())
    return torch.cat(out)


@dataclass
class LetterAbsorption:
    """Per-letter results: main latents, probe F1, and the absorption of the true positives."""

    letter: str
    main_latents: list[int]
    probe_f1: float
    n_true_positives: int
    mean_fraction: float
    full_rate: float
    word_fractions: list[float] = field(default_factory=list)
    word_full: list[bool] = field(default_factory=list)
    word_indices: list[int] = field(default_factory=list)  # rows of x, for inspection


@dataclass
class AbsorptionResult:
    """Evaluated letters (probe F1 >= min_probe_f1), the probe's test accuracy, the test rows."""

    letters: dict[str, LetterAbsorption]
    probe_accuracy: float
    test_indices: list[int]

    @property
    def metrics(self) -> dict[str, float]:
        """Means over the evaluated letters (NaN when no letter passed the probe-F1 bar)."""
        evaluated = list(self.letters.values())

        def mean(values: list[float]) -> float:
            return float(np.mean(values)) if values else float("nan")

        return {
            "absorption_fraction": mean([r.mean_fraction for r in evaluated]),
            "absorption_full_rate": mean([r.full_rate for r in evaluated]),
            "absorption_n_letters": float(len(evaluated)),
            "absorption_mean_split_features": mean([len(r.main_latents) for r in evaluated]),
            "absorption_probe_accuracy": self.probe_accuracy,
        }


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    return 2 * tp / max(float(pred.sum() + y.sum()), 1.0)


def main_latents(
    z_train: np.ndarray,
    y_train: np.ndarray,
    z_test: np.ndarray,
    y_test: np.ndarray,
    max_k: int = 10,
    f1_jump: float = 0.03,
) -> list[int]:
    """Step 4 of the module docstring: the top-k latents where k stops improving test F1."""
    from sklearn.linear_model import LogisticRegression

    score = z_train[y_train].mean(0) - z_train[~y_train].mean(0)
    order = np.argsort(-score, kind="stable")
    best, chosen = -np.inf, [int(order[0])]
    for k in range(1, min(max_k, z_train.shape[1]) + 1):
        cols = order[:k]
        probe = LogisticRegression(class_weight="balanced", solver="liblinear")
        probe.fit(z_train[:, cols], y_train)
        f1 = _f1(probe.decision_function(z_test[:, cols]) > 0, y_test)
        if f1 > best + f1_jump:
            best, chosen = f1, [int(c) for c in cols]
        else:
            break
    return chosen


def word_absorption(
    x: Tensor,
    z: Tensor,
    w_dec: Tensor,
    probe_direction: Tensor,
    main: Sequence[int],
    *,
    fraction_cos: float = 0.1,
    full_cos: float = 0.025,
    proportion: float = 0.4,
    max_absorbing: int = 3,
) -> tuple[float, bool]:
    """(absorption fraction, full absorption) of one activation ``x`` (step 5 of the docstring)."""
    p = probe_direction / probe_direction.norm()
    a = float(x @ p)
    proj = w_dec @ p
    cos = proj / w_dec.norm(dim=1).clamp_min(EPS)
    c = z * proj
    is_main = torch.zeros(len(z), dtype=torch.bool)
    is_main[list(main)] = True
    main_proj = float(c[is_main].sum())
    candidates = c[~is_main & (cos >= fraction_cos) & (c > 0)]
    absorb = float(candidates.topk(min(max_absorbing, len(candidates))).values.sum())
    if a <= 0 or main_proj >= a or absorb / a < proportion:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        m = min(absorb, a - main_proj)
        fraction = float(np.clip(m / (m + main_proj), 0.0, 1.0))
    others = torch.where(is_main, torch.full_like(c, -torch.inf), c)
    top = int(others.argmax())
    full = (
        bool((z[is_main] < EPS).all())
        and float(cos[top]) >= full_cos
        and a > 0
        and float(c[top]) / a >= proportion
    )
    return fraction, full


@torch.no_grad()
def letter_absorption(
    x: Tensor,
    z: Tensor,
    w_dec: Tensor,
    probe_direction: Tensor,
    main: Sequence[int],
    *,
    fraction_cos: float = 0.1,
    full_cos: float = 0.025,
    proportion: float = 0.4,
    max_absorbing: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """``word_absorption`` for many words of one letter at once: rows of ``x`` (n, d), ``z``.

    Returns (fractions (n,), full (n,) booleans), equal to calling ``word_absorption`` per row.
    """
    p = probe_direction.float() / probe_direction.norm()
    a = (x.float() @ p).double()
    proj = w_dec.float() @ p
    cos = proj / w_dec.norm(dim=1).clamp_min(EPS)
    c = z.float() * proj
    is_main = torch.zeros(c.shape[1], dtype=torch.bool)
    is_main[list(main)] = True
    main_proj = c[:, is_main].sum(1).double()
    eligible = (~is_main & (cos >= fraction_cos))[None, :] & (c > 0)
    candidates = torch.where(eligible, c, torch.zeros_like(c))
    n_top = min(max_absorbing, c.shape[1])
    absorb = candidates.topk(n_top, dim=1).values.sum(1).double()
    safe_a = torch.where(a > 0, a, torch.ones_like(a))
    m = torch.minimum(absorb, a - main_proj)
    partial = (m / (m + main_proj).clamp_min(EPS)).clamp(0.0, 1.0)
    fraction = torch.where(main_proj <= 0, torch.ones_like(a), partial)
    no_absorption = (a <= 0) | (main_proj >= a) | (absorb / safe_a < proportion)
    fraction = torch.where(no_absorption, torch.zeros_like(a), fraction)
    others = c.masked_fill(is_main[None, :], -torch.inf)
    top = others.argmax(1)
    c_top = others.gather(1, top[:, None]).squeeze(1).double()
    full = (
        (z[:, is_main] < EPS).all(1)
        & (cos[top] >= full_cos)
        & (a > 0)
        & (c_top / safe_a >= proportion)
    )
    return fraction.numpy(), full.numpy()


@torch.no_grad()
def _codes(sae: SAE, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Codes of rows ``x`` already in the SAE's units, in eval mode, as float32 on the CPU."""
    was_training = sae.training
    sae.eval()
    param = next(sae.parameters())
    try:
        return torch.cat(
            [sae.encode(c.to(param.device, param.dtype)).float().cpu() for c in x.split(batch_size)]
        )
    finally:
        sae.train(was_training)


@dataclass
class FirstLetterProbe:
    """Step 3 of the module docstring, fitted once per set of word activations.

    The probe depends on the activations only, not on the SAE, so fit it once
    (``fit_first_letter_probe``) and pass it to ``absorption_from_activations`` for every SAE.
    """

    labels: np.ndarray  # (n,) lower-case first letters
    train: np.ndarray  # row indices
    test: np.ndarray
    classes: np.ndarray  # letters in the order of ``directions``
    directions: np.ndarray  # (n_classes, d) probe weight vectors w_L
    predicted: np.ndarray  # (len(test),) the probe's letter for each test row
    accuracy: float


def fit_first_letter_probe(
    x: Tensor,
    letters: Sequence[str],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    probe_C: float = 1.0,
) -> FirstLetterProbe:
    """A seeded train/test split of the words and a multinomial logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression

    if x.ndim != 2 or len(x) != len(letters):
        raise ValueError(
            f"x must be (n_words, d) with one letter per word; got {tuple(x.shape)} and "
            f"{len(letters)} letters"
        )
    x = x.float().cpu()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    lab = np.asarray([s.lower() for s in letters])
    if n_test == 0 or len(set(lab[train])) < 2:
        raise ValueError("too few words: need test words and at least two letters in training")

    scale = float(x.norm(dim=1).mean().clamp_min(EPS))  # one scalar: directions are unchanged
    probe = LogisticRegression(C=probe_C, max_iter=2000)
    probe.fit(x[train].numpy() / scale, lab[train])
    predicted = probe.predict(x[test].numpy() / scale)
    coef = probe.coef_ if len(probe.classes_) > 2 else np.concatenate([-probe.coef_, probe.coef_])
    return FirstLetterProbe(
        labels=lab,
        train=train,
        test=test,
        classes=probe.classes_,
        directions=coef,
        predicted=predicted,
        accuracy=float((predicted == lab[test]).mean()),
    )


@torch.no_grad()
def absorption_from_activations(
    sae: SAE,
    x: Tensor,
    letters: Sequence[str],
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    max_k: int = 10,
    f1_jump: float = 0.03,
    min_probe_f1: float = 0.6,
    probe_C: float = 1.0,
    probe: FirstLetterProbe | None = None,
) -> AbsorptionResult:
    """Steps 3-5 of the module docstring on word activations ``x`` (n, d) with first ``letters``.

    ``probe``: a ``fit_first_letter_probe`` result for these same ``x`` and ``letters`` (then
    ``test_fraction``, ``seed`` and ``probe_C`` are not used); by default one is fitted here.
    """
    if probe is None:
        probe = fit_first_letter_probe(
            x, letters, test_fraction=test_fraction, seed=seed, probe_C=probe_C
        )
    elif len(probe.labels) != len(x) or len(letters) != len(x):
        raise ValueError(
            f"the probe was fitted on {len(probe.labels)} words, but x has {len(x)} rows and "
            f"{len(letters)} letters; fit it on the same words"
        )
    # The SAE reads x * input_scale (activations normalised in training); c_i and a are then
    # both in those units, and every ratio of step 5 is unchanged by the scale.
    x = sae.scale_in(x.float().cpu())
    lab, train, test, predicted = probe.labels, probe.train, probe.test, probe.predicted

    z = _codes(sae, x)
    w_dec = sae.decoder_directions.detach().float().cpu()
    z_np = z.numpy()

    results: dict[str, LetterAbsorption] = {}
    for class_index, letter in enumerate(probe.classes):
        y_train, y_test = lab[train] == letter, lab[test] == letter
        if y_test.sum() == 0 or y_train.sum() == 0:
            continue
        f1 = _f1(predicted == letter, y_test)
        if f1 < min_probe_f1:
            continue
        main = main_latents(z_np[train], y_train, z_np[test], y_test, max_k, f1_jump)
        direction = torch.as_tensor(probe.directions[class_index], dtype=torch.float32)
        rows = test[(predicted == letter) & y_test]
        fractions, fulls = letter_absorption(x[rows], z[rows], w_dec, direction, main)
        results[str(letter)] = LetterAbsorption(
            letter=str(letter),
            main_latents=main,
            probe_f1=f1,
            n_true_positives=len(rows),
            mean_fraction=float(np.mean(fractions)),
            full_rate=float(np.mean(fulls)),
            word_fractions=[float(f) for f in fractions],
            word_full=[bool(f) for f in fulls],
            word_indices=[int(r) for r in rows],
        )
    return AbsorptionResult(results, probe.accuracy, [int(t) for t in test])


def feature_absorption(
    model: Any,
    sae: SAE,
    site: str,
    tokenizer: Any = None,
    *,
    max_words: int = 2000,
    seed: int = 0,
    prefix: str = DEFAULT_PREFIX,
    batch_size: int = 64,
    **kwargs: Any,
) -> dict[str, float]:
    """First-letter absorption of ``sae`` at ``site`` of a causal LM (module docstring).

    Returns ``absorption_fraction``, ``absorption_full_rate``, ``absorption_n_letters``,
    ``absorption_mean_split_features``, ``absorption_probe_accuracy``, ``absorption_n_words``.
    ``kwargs`` go to ``absorption_from_activations`` (thresholds, ``test_fraction``, ...).
    """
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("no tokenizer: pass tokenizer= or a LoadedModel that has one")
    ids, words = first_letter_vocab(tokenizer)
    pick = np.sort(np.random.default_rng(seed).permutation(len(ids))[:max_words])
    ids, words = [ids[i] for i in pick], [words[i] for i in pick]
    x = word_activations(model, site, tokenizer, ids, prefix, batch_size)
    result = absorption_from_activations(sae, x, [w[0] for w in words], seed=seed, **kwargs)
    return {**result.metrics, "absorption_n_words": float(len(ids))}
