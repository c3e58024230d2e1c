"""Helpers for the SAEBench notebook (paper 19: Karvonen et al., ICML 2025).

Two pieces that the shared evals do not provide in the form a many-SAE sweep needs:

* ``SplicedLoss``: CE loss recovered with the clean and zero-ablation passes computed **once** for
  a fixed set of token windows, then one spliced forward pass per SAE (``downstream_loss`` in
  ``common.evals.downstream`` runs all four passes for every SAE). Same definition:

      loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean)

  with the site's tensor replaced only at the kept positions. The SAE sees activations in its
  training units: x_hat = scale_out(decode(encode(scale_in(a)))).
* ``spearman``: the rank correlation SAEBench uses to relate metrics across SAEs,

      rho = Pearson(rank(a), rank(b))      (average ranks for ties)

  NaN when fewer than three finite pairs remain or a side is constant.

And the notebook's bookkeeping: ``finite`` (non-finite scores as NaN) and ``summary_line`` (one
progress line per trained SAE).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from common.evals.downstream import replace_at_site, sequence_site, unwrap_model
from common.sae import SAE


def spearman(a: Any, b: Any) -> float:
    """Spearman's rho over the pairs where both values are finite (NaN if < 3 or constant)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3:
        return float("nan")
    ra, rb = rankdata(a[ok]), rankdata(b[ok])
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


class SplicedLoss:
    """CE loss recovered for many SAEs on the same windows (module docstring).

    ``ids`` (N, T) token windows, ``keep`` (N, T) the positions the SAE replaces. CE is the mean
    next-token cross-entropy over predictions from kept positions t < T - 1.
    """

    @torch.no_grad()
    def __init__(
        self, model: Any, site: str, ids: Tensor, keep: Tensor, batch_size: int = 4
    ) -> None:
        if ids.shape != keep.shape or ids.ndim != 2:
            raise ValueError(f"ids {tuple(ids.shape)} and keep {tuple(keep.shape)} must be (N, T)")
        self.net = unwrap_model(model)
        self.site = sequence_site(self.net, site)
        self.ids, self.keep, self.batch_size = ids, keep.bool(), batch_size
        self.ce_clean = self._ce(None)
        self.ce_zero = self._ce(torch.zeros_like)

    def _ce(self, values: Any) -> float:
        total, count = 0.0, 0
        for i in range(0, len(self.ids), self.batch_size):
            ids = self.ids[i : i + self.batch_size]
            keep = self.keep[i : i + self.batch_size]

            def splice(a: Tensor, keep: Tensor = keep) -> Tensor:
                out = a.clone()
                out[keep] = values(a[keep]).to(a.dtype)
                return out

            if values is None:
                logits = self.net(input_ids=ids, use_cache=False).logits
            else:
                with replace_at_site(self.site, splice):
                    logits = self.net(input_ids=ids, use_cache=False).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            ce = -logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
            mask = keep[:, :-1]
            total += float(ce[mask].double().sum())
            count += int(mask.sum())
        return total / max(count, 1)

    @torch.no_grad()
    def __call__(self, sae: SAE) -> dict[str, float]:
        """``ce_sae`` and ``ce_loss_recovered`` of ``sae`` spliced in at the site."""
        was_training = sae.training
        sae.eval()

        def reconstruct(rows: Tensor) -> Tensor:
            return sae.scale_out(sae.decode(sae.encode(sae.scale_in(rows.float()))))

        try:
            ce_sae = self._ce(reconstruct)
        finally:
            sae.train(was_training)
        gap = self.ce_zero - self.ce_clean
        recovered = (self.ce_zero - ce_sae) / gap if gap != 0 else float("nan")
        return {"ce_sae": ce_sae, "ce_loss_recovered": recovered}


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """``metrics`` with every non-finite value made NaN (one marker for "not measured")."""
    return {key: value if np.isfinite(value) else float("nan") for key, value in metrics.items()}


SUMMARY = ("fvu", "l0", "ce_loss_recovered", "probe_sae_k1_acc", "absorption_fraction")


def summary_line(
    seed: int, arch: str, metrics: dict[str, float], t_train: float, t_eval: float
) -> str:
    """One progress line per trained SAE: its timings and headline metrics."""
    values = "  ".join(f"{m}={metrics.get(m, float('nan')):.3f}" for m in SUMMARY)
    return f"seed {seed} {arch:>10}: train {t_train:5.1f}s eval {t_eval:5.1f}s  {values}"
