"""Golden tests: our metric definitions agree with SAELens's own evaluation on the same inputs.

Same model: a tiny random GPT-2 in transformers, converted with TransformerLens's own GPT-2 weight
conversion into a ``HookedTransformer`` (what SAELens evaluates on); the two give the same logits.
Same SAE: ours, exported with ``export_saelens`` and loaded by ``sae_lens.SAE.load_from_disk``.
Same tokens: SAELens reads them from a stand-in activation store (``get_batch_tokens``).

Pinned (SAELens 6.54 name -> ours), tolerances below:

    get_sparsity_and_variance_metrics            common.evals.evaluate.evaluate
      mse                   -> mse               E_n ||x_n - x_hat_n||^2 (sum over d, mean over n)
      explained_variance    -> explained_variance 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2
      l0, l1                -> l0, l1
      cossim                -> cosine
      relative_reconstruction_bias -> shrinkage_gamma (per batch in SAELens: one batch here)
    get_downstream_reconstruction_metrics        common.evals.downstream.downstream_loss
      ce_loss_without_sae / with_sae / with_ablation -> ce_clean / ce_sae / ce_zero_ablation
      ce_loss_score         -> ce_loss_recovered
      kl_div_with_sae / with_ablation -> kl_sae / kl_zero_ablation;  kl_div_score -> kl_recovered

SAELens's ``explained_variance_legacy`` (the mean over tokens of the per-token ratio
1 - ||x - x_hat||^2 / ||x - mean(x)||^2) is not what we report: ``explained_variance`` is pooled
over tokens and measured about the mean, like SAELens's current ``explained_variance``.
SAELens's ``ignore_tokens`` (here the BOS id) is our ``keep = ids != BOS``; SAELens zero-ablates
every position, ignored ones included, hence ``ablate_all_positions=True`` in that case.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as T

from common.evals.downstream import downstream_loss, site_activations
from common.evals.evaluate import evaluate
from common.sae.base import SAE
from common.sae.registry import build_sae
from common.sae.saelens_io import export_saelens

V, D, LAYERS, HEADS, FF, CTX = 64, 32, 2, 4, 48, 32
N_WINDOWS, BOS = 8, 0
HOOK, SITE = "blocks.0.hook_resid_post", "resid_post.0"

# Tolerances: float32 forward passes of two implementations of the same network.
REL = 1e-5  # mse, l1, gamma (relative)
ABS = 1e-5  # explained variance, cosine, L0, cross-entropies (nats)
RATIO_ABS = 1e-4  # loss recovered: a ratio of differences of cross-entropies
KL_REL = 1e-4  # KL divergences (relative)


@pytest.fixture(scope="module")
def saelens() -> Any:
    return pytest.importorskip("sae_lens", reason="sae_lens is not installed")


@pytest.fixture(scope="module")
def models(saelens) -> tuple[torch.nn.Module, Any]:
    """(transformers GPT-2, the same weights as a TransformerLens HookedTransformer)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    torch.manual_seed(0)
    config = T.GPT2Config(
        vocab_size=V,
        n_embd=D,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=CTX,
        n_inner=FF,
        bos_token_id=BOS,
        eos_token_id=BOS,
        initializer_range=0.3,  # peaked next-token distributions: ablations change the loss
    )
    hf = T.GPT2LMHeadModel(config).eval()
    cfg = HookedTransformerConfig(
        n_layers=LAYERS,
        d_model=D,
        n_ctx=CTX,
        d_head=D // HEADS,
        n_heads=HEADS,
        d_mlp=FF,
        d_vocab=V,
        act_fn="gelu_new",  # GPT2Config's default activation_function
        normalization_type="LN",
        eps=config.layer_norm_epsilon,
        positional_embedding_type="standard",
        default_prepend_bos=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer" and similar notices
        tl = HookedTransformer(cfg)
    state = convert_gpt2_weights(hf, cfg)
    state["unembed.b_U"] = torch.zeros(V)  # GPT-2's LM head has no bias
    tl.load_state_dict(state, strict=False)
    return hf, tl.eval()


@pytest.fixture(scope="module")
def ids(models) -> torch.Tensor:
    """Windows sampled from the model itself (never the BOS after position 0).

    On its own samples the model beats the uniform guess, so ablating the site costs loss; on
    uniformly random tokens a random network is worse than uniform and "loss recovered" is moot.
    """
    hf, _ = models
    g = torch.Generator().manual_seed(1)
    out = torch.full((N_WINDOWS, 1), BOS)
    with torch.no_grad():
        for _ in range(CTX - 1):
            logits = hf(input_ids=out).logits[:, -1]
            logits[:, BOS] = -torch.inf
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=g)
            out = torch.cat([out, nxt], dim=1)
    return out


def _trained_sae(arch: str, x: torch.Tensor, **kwargs: Any) -> SAE:
    """A few hundred full-batch Adam steps: enough for a meaningful reconstruction."""
    torch.manual_seed(0)
    sae = build_sae(arch, d_in=D, d_sae=4 * D, **kwargs)
    sae.init_from_data(x)
    opt = torch.optim.Adam(sae.parameters(), lr=5e-3)
    for _ in range(300):
        opt.zero_grad()
        sae.loss(x).loss.backward()
        opt.step()
        sae.after_step()
    return sae.eval()


class TokenStore:
    """What SAELens's eval functions read from an ``ActivationsStore``: fixed token batches."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids, self.start = ids, 0

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = self.ids[self.start : self.start + n]
        self.start += n
        return batch

    def reset_input_dataset(self) -> None:
        self.start = 0


@pytest.fixture(scope="module", params=["relu", "topk", "topk_normalized"])
def saes(request, models, ids, saelens, tmp_path_factory) -> tuple[SAE, Any]:
    """(our SAE, the same SAE exported and loaded by SAELens). ``_normalized``: trained on c x with
    input_scale c, E||c x|| = sqrt(d), as the pipeline trains every LM SAE; the export folds c into
    the weights, so SAELens is fed the raw activations."""
    hf, _ = models
    x = site_activations(hf, SITE, ids)[ids != BOS]
    arch = request.param.removesuffix("_normalized")
    kwargs: dict[str, Any] = {"k": 6} if arch == "topk" else {"l1_coefficient": 3e-3}
    if request.param.endswith("_normalized"):
        scale = D**0.5 / x.norm(dim=1).mean().item()
        assert abs(scale - 1) > 0.1  # a scale that matters
        kwargs["input_scale"] = scale
        x = x * scale
    ours = _trained_sae(arch, x, **kwargs)
    folder = export_saelens(ours, tmp_path_factory.mktemp(request.param), hook_name=HOOK)
    theirs = saelens.SAE.load_from_disk(str(Path(folder)))
    return ours, theirs


def test_the_two_models_are_the_same_network(models, ids) -> None:
    hf, tl = models
    with torch.no_grad():
        hf_logits = hf(input_ids=ids).logits
        tl_logits, cache = tl.run_with_cache(ids, names_filter=[HOOK])
    assert torch.allclose(hf_logits, tl_logits, atol=1e-4)
    assert torch.allclose(site_activations(hf, SITE, ids), cache[HOOK], atol=1e-5)


@pytest.mark.parametrize("ignore_bos", [False, True])
def test_reconstruction_and_sparsity_match_saelens(models, ids, saes, ignore_bos) -> None:
    from sae_lens.evals import get_sparsity_and_variance_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    hf, tl = models
    ours_sae, their_sae = saes
    theirs, _ = get_sparsity_and_variance_metrics(
        their_sae,
        tl,
        TokenStore(ids),
        ActivationScaler(),
        n_batches=1,  # one batch: SAELens's per-batch gamma is then the pooled one
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=False,
        eval_batch_size_prompts=N_WINDOWS,
        model_kwargs={},
        ignore_tokens=[BOS] if ignore_bos else None,
    )
    keep = ids != BOS if ignore_bos else torch.ones_like(ids, dtype=torch.bool)
    ours = evaluate(ours_sae, site_activations(hf, SITE, ids)[keep])
    assert 0.3 < ours["explained_variance"] < 1.0  # a meaningful SAE, not a degenerate one
    assert ours["mse"] == pytest.approx(theirs["mse"], rel=REL)
    assert ours["explained_variance"] == pytest.approx(theirs["explained_variance"], abs=ABS)
    assert ours["l0"] == pytest.approx(theirs["l0"], abs=ABS)
    assert ours["l1"] == pytest.approx(theirs["l1"], rel=REL)
    assert ours["cosine"] == pytest.approx(theirs["cossim"], abs=ABS)
    assert ours["shrinkage_gamma"] == pytest.approx(theirs["relative_reconstruction_bias"], rel=REL)
    # The legacy definition (mean of per-token ratios) is a different number on these data.
    assert abs(theirs["explained_variance_legacy"] - ours["explained_variance"]) > 10 * ABS


@pytest.mark.parametrize("ignore_bos", [False, True])
def test_downstream_loss_matches_saelens(models, ids, saes, ignore_bos) -> None:
    from sae_lens.evals import get_downstream_reconstruction_metrics
    from sae_lens.training.activation_scaler import ActivationScaler

    hf, tl = models
    ours_sae, their_sae = saes
    theirs = get_downstream_reconstruction_metrics(
        their_sae,
        tl,
        TokenStore(ids),
        ActivationScaler(),
        compute_kl=True,
        compute_ce_loss=True,
        n_batches=2,  # several batches: both pool the per-token values over all of them
        eval_batch_size_prompts=N_WINDOWS // 2,
        ignore_tokens=[BOS] if ignore_bos else None,
    )
    keep = ids != BOS if ignore_bos else torch.ones_like(ids, dtype=torch.bool)
    ours = downstream_loss(
        hf, ours_sae, SITE, ids, keep, batch_size=3, ablate_all_positions=ignore_bos
    )
    assert ours["ce_zero_ablation"] - ours["ce_clean"] > 0.1  # the site matters to the model
    assert ours["ce_clean"] == pytest.approx(theirs["ce_loss_without_sae"], abs=ABS)
    assert ours["ce_sae"] == pytest.approx(theirs["ce_loss_with_sae"], abs=ABS)
    assert ours["ce_zero_ablation"] == pytest.approx(theirs["ce_loss_with_ablation"], abs=ABS)
    assert ours["ce_loss_recovered"] == pytest.approx(theirs["ce_loss_score"], abs=RATIO_ABS)
    assert ours["kl_sae"] == pytest.approx(theirs["kl_div_with_sae"], rel=KL_REL)
    assert ours["kl_zero_ablation"] == pytest.approx(theirs["kl_div_with_ablation"], rel=KL_REL)
    assert ours["kl_recovered"] == pytest.approx(theirs["kl_div_score"], abs=RATIO_ABS)
