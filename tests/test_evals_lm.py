"""LM-side evaluations: downstream loss, sparse probing, first-letter absorption, top contexts.

Tiny random transformers (saved with ``save_pretrained`` and read back through ``load_model``, the
code path of real models) and hand-built SAEs whose answers are known: an identity SAE must leave
the LM untouched, a zero SAE must equal zero-ablation, an SAE with planted absorbing latents must
show exactly the planted absorption. One test runs on the real SmolLM2 when its converted cache
(``data/lm/models``) exists; it never converts the GGUF itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from common.evals.absorption import (
    absorption_from_activations,
    feature_absorption,
    first_letter_vocab,
    fit_first_letter_probe,
    letter_absorption,
    word_absorption,
    word_activations,
)
from common.evals.contexts import top_activating_contexts
from common.evals.downstream import downstream_loss, site_activations
from common.evals.probing import document_activations, sparse_probing, top_k_by_mean_difference
from common.models import load_model
from common.models.loading import DEFAULT_CACHE_DIR, SMOLLM2_CACHE_NAME
from common.sae.base import SAE
from common.sae.registry import build_sae

D, FF, VOCAB, SEQ = 32, 48, 64, 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory):
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.3,  # peaked next-token distributions: ablations change the loss
    )
    folder = tmp_path_factory.mktemp("tiny_llama")
    T.LlamaForCausalLM(config).save_pretrained(folder)
    return load_model(str(folder))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    out = torch.randint(2, VOCAB, (5, SEQ), generator=g)
    out[:, 0] = 1  # BOS
    return out


def relu_sae(d_in: int, d_sae: int, w_enc: torch.Tensor, w_dec: torch.Tensor, **biases) -> SAE:
    sae = build_sae("relu", d_in=d_in, d_sae=d_sae)
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.copy_(biases.get("b_enc", torch.zeros(d_sae)))
        sae.b_dec.copy_(biases.get("b_dec", torch.zeros(d_in)))
    return sae.eval()


def identity_sae(d: int) -> SAE:
    """x_hat = ReLU(x) - ReLU(-x) = x exactly."""
    eye = torch.eye(d)
    return relu_sae(d, 2 * d, torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0))


def constant_sae(d: int, value: torch.Tensor) -> SAE:
    """x_hat = value for every x (no latent ever fires)."""
    return relu_sae(d, 4, torch.zeros(d, 4), torch.zeros(4, d), b_enc=-torch.ones(4), b_dec=value)


def ce_by_hand(logits: torch.Tensor, ids: torch.Tensor, positions: slice = slice(None)) -> float:
    """Next-token cross-entropy from the predictions at ``positions`` (of t < T-1)."""
    logits, targets = logits[:, :-1][:, positions], ids[:, 1:][:, positions]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()


# --- downstream loss -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("site", "width"),
    [("resid_post.0", D), ("mlp_out.1", D), ("attn_z.1", D), ("mlp_hidden.0", FF)],
)
def test_identity_and_constant_saes_bracket_the_loss(llama, ids, site: str, width: int) -> None:
    exact = downstream_loss(llama, identity_sae(width), site, ids)
    assert exact["ce_sae"] == pytest.approx(exact["ce_clean"], abs=1e-6)
    assert exact["kl_sae"] == pytest.approx(0.0, abs=1e-7)
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["kl_zero_ablation"] > 1e-3  # the ablation does change the model here

    zero = downstream_loss(llama, constant_sae(width, torch.zeros(width)), site, ids)
    assert zero["ce_sae"] == pytest.approx(zero["ce_zero_ablation"], abs=1e-6)
    assert zero["kl_sae"] == pytest.approx(zero["kl_zero_ablation"], rel=1e-5)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)

    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, 0] = False
    mu = site_activations(llama, site, ids)[keep].mean(0)
    mean = downstream_loss(llama, constant_sae(width, mu), site, ids)
    assert mean["ce_sae"] == pytest.approx(mean["ce_mean_ablation"], abs=1e-5)
    assert mean["ce_loss_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-3)


@pytest.mark.parametrize(("site", "module"), [("mlp_out.0", "mlp.down_proj"), ("attn_z.1", "")])
def test_zero_ablation_equals_a_model_without_that_component(llama, ids, site, module) -> None:
    """Zeroing the MLP output / W_O input everywhere == zeroing that weight (no biases in Llama)."""
    layer = int(site.split(".")[1])
    keep = torch.ones_like(ids, dtype=torch.bool)
    ours = downstream_loss(llama, identity_sae(D), site, ids, keep_mask=keep)
    net = llama.model
    block = net.model.layers[layer]
    weight = block.get_submodule(module or "self_attn.o_proj").weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.zero_()
        ablated_logits = net(input_ids=ids).logits
        weight.copy_(saved)
        clean_logits = net(input_ids=ids).logits
    assert ours["ce_zero_ablation"] == pytest.approx(ce_by_hand(ablated_logits, ids), abs=1e-5)
    assert ours["ce_clean"] == pytest.approx(ce_by_hand(clean_logits, ids), abs=1e-5)
    kl = F.kl_div(
        ablated_logits.log_softmax(-1),
        clean_logits.log_softmax(-1),
        log_target=True,
        reduction="none",
    )
    assert ours["kl_zero_ablation"] == pytest.approx(kl.sum(-1).mean().item(), rel=1e-4)


def test_keep_mask_restricts_the_splice_and_the_average(llama, ids) -> None:
    """Keep only t >= 5: a zero SAE there equals a hand-written hook; earlier t stay clean."""
    start = 5
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, start:] = True
    ours = downstream_loss(llama, constant_sae(D, torch.zeros(D)), "resid_post.0", ids, keep)

    net = llama.model

    def zero_late(_module, _args, output):
        out = (output[0] if isinstance(output, tuple) else output).clone()
        out[:, start:] = 0
        return (out, *output[1:]) if isinstance(output, tuple) else out

    with torch.no_grad():
        clean = net(input_ids=ids).logits
        handle = net.model.layers[0].register_forward_hook(zero_late)
        spliced = net(input_ids=ids).logits
        handle.remove()
    assert torch.allclose(clean[:, :start], spliced[:, :start], atol=1e-6)  # causal: untouched
    assert ours["ce_sae"] == pytest.approx(ce_by_hand(spliced, ids, slice(start, None)), abs=1e-5)
    assert ours["ce_clean"] == pytest.approx(ce_by_hand(clean, ids, slice(start, None)), abs=1e-5)
    kl = (clean.softmax(-1) * (clean.log_softmax(-1) - spliced.log_softmax(-1))).sum(-1)
    assert ours["kl_sae"] == pytest.approx(kl[:, start:].mean().item(), rel=1e-4)
    assert ours["n_tokens"] == ids.shape[0] * (SEQ - 1 - start)

    # SAELens's convention ablates every position, the excluded ones included.
    everywhere = downstream_loss(
        llama, identity_sae(D), "resid_post.0", ids, keep, ablate_all_positions=True
    )
    assert everywhere["ce_zero_ablation"] != pytest.approx(ours["ce_zero_ablation"], abs=1e-4)


def test_downstream_rejects_bad_input(llama, ids) -> None:
    with pytest.raises(ValueError, match="valid sites"):
        downstream_loss(llama, identity_sae(D), "resid_post.9", ids)
    with pytest.raises(ValueError, match="must match"):
        downstream_loss(llama, identity_sae(D), "resid_post.0", ids, keep_mask=ids[:, :3] > 0)
    with pytest.raises(ValueError, match="integer token ids"):
        downstream_loss(llama, identity_sae(D), "resid_post.0", ids.float())


# --- sparse probing ------------------------------------------------------------------------------
class CharTokenizer:
    """A stand-in tokenizer: one token per character, BOS = 1."""

    bos_token_id, pad_token_id = 1, 0

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[2 + ord(c) % (VOCAB - 2) for c in text] for text in texts]}

    def decode(self, token_ids):
        return "".join(chr(ord("a") + (i - 2) % 26) for i in token_ids)


def test_document_activations_do_not_depend_on_padding(llama) -> None:
    texts = ["short", "a much longer document here", "mid length"]
    tok = CharTokenizer()
    last = document_activations(llama, "resid_post.1", texts, tok, batch_size=3)
    mean = document_activations(llama, "resid_post.1", texts, tok, pooling="mean", batch_size=3)
    for i, text in enumerate(texts):
        alone = site_activations(
            llama, "resid_post.1", torch.tensor([[1, *tok([text])["input_ids"][0]]])
        )
        assert torch.allclose(last[i], alone[0, -1], atol=1e-5)
        assert torch.allclose(mean[i], alone[0, 1:].mean(0), atol=1e-5)
    with pytest.raises(ValueError, match="empty"):
        document_activations(llama, "resid_post.1", ["ok", ""], tok)


def _probing_data(n: int = 450, d: int = 16, seed: int = 0):
    """Three classes, class c adds 3 e_c to Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    labels = [("a", "b", "c")[i % 3] for i in range(n)]
    x = torch.randn(n, d, generator=g)
    for i, lab in enumerate(labels):
        x[i, "abc".index(lab)] += 3.0
    return x, labels


def test_sparse_probing_finds_the_informative_latent() -> None:
    x, labels = _probing_data()
    d = x.shape[1]
    aligned = relu_sae(d, d, torch.eye(d), torch.eye(d))  # latent c reads the class direction
    blind = torch.zeros(d, d)
    blind[3:, 3:] = torch.eye(d - 3)  # latents read only noise dimensions
    blind_sae = relu_sae(d, d, blind, torch.eye(d))
    good = sparse_probing(aligned, x, labels, ks=(1, 2))
    bad = sparse_probing(blind_sae, x, labels, ks=(1, 2))
    assert good["probe_n_tasks"] == 3
    for task in ("a_vs_rest", "b_vs_rest", "c_vs_rest"):
        assert good[f"probe_{task}_sae_k1_auc"] > 0.95
        assert good[f"probe_{task}_raw_full_auc"] > 0.95
        assert good[f"probe_{task}_raw_k1_auc"] > 0.95
        assert bad[f"probe_{task}_sae_k1_auc"] < 0.7
    assert bad["probe_raw_full_auc"] == pytest.approx(good["probe_raw_full_auc"])  # same split
    y = np.array([lab == "b" for lab in labels], dtype=np.int64)
    z = aligned.encode(x).detach().numpy()
    assert top_k_by_mean_difference(z, y, 1).tolist() == [1]


def test_sparse_probing_explicit_tasks_drop_other_labels() -> None:
    x, labels = _probing_data()
    sae = relu_sae(16, 16, torch.eye(16), torch.eye(16))
    out = sparse_probing(sae, x, labels, ks=(1,), tasks=[("a", "b")], penalty="l2")
    assert out["probe_n_tasks"] == 1
    assert out["probe_a_vs_b_sae_k1_auc"] > 0.95
    with pytest.raises(ValueError, match="not in"):
        sparse_probing(sae, x, labels, tasks=[("a", "zzz")])
    with pytest.raises(ValueError, match="one label per document"):
        sparse_probing(sae, x[:10], labels)


# --- absorption ----------------------------------------------------------------------------------
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS_PER_LETTER = 20


def _absorption_data(absorb: bool):
    """Words x = 2 e_L + u_w (orthonormal e, u); every third "s" word is absorbed if ``absorb``.

    SAE: latent L reads e_L with bias -1 and writes e_L. With absorption, latent "s" is suppressed
    on the absorbed words (encoder e_s - 3 sum u_A) and each absorbed word w gets its own latent
    (encoder 4 u_w, bias -1.5, so z = 2.5 on w only) writing (2 e_s + u_w) / sqrt(5).
    """
    n = 26 * WORDS_PER_LETTER
    d = 26 + n
    letters = [LETTERS[i // WORDS_PER_LETTER] for i in range(n)]
    basis = torch.eye(d)
    x = torch.stack([2 * basis[LETTERS.index(c)] + basis[26 + i] for i, c in enumerate(letters)])
    s = LETTERS.index("s")
    absorbed = [i for i in range(n) if letters[i] == "s" and i % 3 == 0] if absorb else []
    d_sae = 26 + len(absorbed)
    w_enc, w_dec = torch.zeros(d, d_sae), torch.zeros(d_sae, d)
    b_enc = torch.full((d_sae,), -1.0)
    w_enc[:26, :26], w_dec[:26, :26] = torch.eye(26), torch.eye(26)
    for j, i in enumerate(absorbed):
        w_enc[:, s] -= 3 * basis[26 + i]
        w_enc[:, 26 + j] = 4 * basis[26 + i]
        b_enc[26 + j] = -1.5
        w_dec[26 + j] = (2 * basis[s] + basis[26 + i]) / 5**0.5
    return x, letters, relu_sae(d, d_sae, w_enc, w_dec, b_enc=b_enc), set(absorbed)


def test_planted_absorption_is_measured_exactly() -> None:
    x, letters, sae, absorbed = _absorption_data(absorb=True)
    result = absorption_from_activations(sae, x, letters, seed=0)
    assert result.probe_accuracy == 1.0
    assert len(result.letters) == 26
    s = result.letters["s"]
    assert s.main_latents == [LETTERS.index("s")]
    expected = np.mean([i in absorbed for i in s.word_indices])
    assert 0 < expected < 1
    assert s.full_rate == pytest.approx(expected)
    assert s.mean_fraction == pytest.approx(expected)
    for letter, r in result.letters.items():
        assert r.main_latents == [LETTERS.index(letter)]
        if letter != "s":
            assert r.full_rate == 0 and r.mean_fraction == 0
    metrics = result.metrics
    assert metrics["absorption_full_rate"] == pytest.approx(expected / 26)
    assert metrics["absorption_mean_split_features"] == 1.0

    x, letters, clean_sae, _ = _absorption_data(absorb=False)
    control = absorption_from_activations(clean_sae, x, letters, seed=0).metrics
    assert control["absorption_fraction"] == 0 and control["absorption_full_rate"] == 0
    assert control["absorption_n_letters"] == 26


def test_word_absorption_partial_fraction() -> None:
    """a = 2; the main latent writes 0.5 of it and an aligned absorber 1.5: fraction 0.75."""
    e = torch.eye(4)

    def unit(cos: float) -> torch.Tensor:
        return cos * e[0] + (1 - cos**2) ** 0.5 * e[1]

    w_dec = torch.stack([e[0], e[0], unit(0.05), unit(0.02)])  # main, absorber, weak, weaker
    x = 2 * e[0]

    def run(*z: float) -> tuple[float, bool]:
        return word_absorption(x, torch.tensor(z), w_dec, e[0], [0])

    assert run(0.5, 1.5, 0, 0) == (pytest.approx(0.75), False)  # the main latent fires: not full
    assert run(0, 1.5, 0, 0) == (1.0, True)
    assert run(0, 0.5, 0, 0) == (0.0, False)  # the absorber writes only 25% of the projection
    # SAEBench's two cosine bars: cos 0.05 counts for full absorption (>= 0.025), not for the
    # fraction (>= 0.1); cos 0.02 counts for neither.
    assert run(0, 0, 30, 0) == (0.0, True)
    assert run(0, 0, 0, 100) == (0.0, False)


def test_letter_absorption_equals_word_absorption_row_by_row() -> None:
    """The batched form gives, word for word, the per-word definition (all branches hit)."""
    g = torch.Generator().manual_seed(3)
    n, d, d_sae = 300, 16, 40
    w_dec = torch.randn(d_sae, d, generator=g)
    w_dec[:8] = w_dec[:8] / w_dec[:8].norm(dim=1, keepdim=True) * 0.5  # non-unit norms too
    direction = torch.randn(d, generator=g)
    z = torch.relu(torch.randn(n, d_sae, generator=g)) * (torch.rand(n, d_sae, generator=g) < 0.2)
    x = z @ w_dec + 0.3 * torch.randn(n, d, generator=g)
    main = [int((w_dec @ direction).argmax()), 5]
    z[::4, main] = 0  # main latents off: full absorption and fraction 1 become possible
    fractions, fulls = letter_absorption(x, z, w_dec, direction, main)
    expected = [word_absorption(x[i], z[i], w_dec, direction, main) for i in range(n)]
    assert fractions == pytest.approx([f for f, _ in expected], abs=1e-5)
    assert fulls.tolist() == [full for _, full in expected]
    assert len({round(float(f), 3) for f in fractions}) > 3 and 0 < fulls.mean() < 1


def test_a_fitted_probe_reused_across_saes_changes_nothing() -> None:
    x, letters, sae, _ = _absorption_data(absorb=True)
    probe = fit_first_letter_probe(x, letters, seed=0)
    fresh = absorption_from_activations(sae, x, letters, seed=0)
    reused = absorption_from_activations(sae, x, letters, probe=probe)
    assert reused.metrics == fresh.metrics
    assert reused.letters["s"].word_fractions == fresh.letters["s"].word_fractions
    with pytest.raises(ValueError, match="same words"):
        absorption_from_activations(sae, x[:-1], letters[:-1], probe=probe)


def test_absorption_reads_activations_in_the_units_the_sae_was_trained_in() -> None:
    """An SAE trained on x * 3 (normalised activations) with W_enc / 3 and W_dec * 3 is the
    planted SAE in other units: the same codes, the same absorption."""
    x, letters, sae, _ = _absorption_data(absorb=True)
    scaled = build_sae("relu", d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, input_scale=3.0)
    with torch.no_grad():
        scaled.W_enc.copy_(sae.W_enc / 3)
        scaled.W_dec.copy_(sae.W_dec * 3)
        scaled.b_enc.copy_(sae.b_enc)
        scaled.b_dec.zero_()
    expected = absorption_from_activations(sae, x, letters, seed=0).metrics
    assert expected["absorption_full_rate"] > 0
    got = absorption_from_activations(scaled.eval(), x, letters, seed=0).metrics
    assert got == pytest.approx(expected)


def test_word_activations_with_a_cached_prefix_equal_the_full_forward(llama) -> None:
    """The prefix's keys and values are computed once; each word then runs alone."""

    class Tok:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [2 + ord(ch) % (VOCAB - 2) for ch in text]}

    words = list(range(2, VOCAB))
    for site in ("resid_post.0", "resid_post.1"):
        fast = word_activations(llama, site, Tok(), words, prefix="ab c\n", batch_size=16)
        slow = word_activations(
            llama, site, Tok(), words, prefix="ab c\n", batch_size=16, reuse_prefix=False
        )
        assert fast.shape == (len(words), D)
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-4)


def test_first_letter_vocab_keeps_space_prefixed_words() -> None:
    class Tok:
        def get_vocab(self):
            return {"Ġapple": 5, "Ġa": 6, "banana": 7, "ĠPar1s": 8, "ĠParis": 9, "Ġ": 10}

        def convert_tokens_to_string(self, tokens):
            return tokens[0].replace("Ġ", " ")

    ids, words = first_letter_vocab(Tok())
    assert ids == [5, 9] and words == ["apple", "Paris"]


# --- top-activating contexts ---------------------------------------------------------------------
def test_top_activating_contexts_match_brute_force(llama, ids) -> None:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(D, 6, generator=g)
    b_enc = torch.zeros(6)
    b_enc[5] = -1e6  # latent 5 never fires
    sae = relu_sae(D, 6, w, w.t().contiguous(), b_enc=b_enc)
    out = top_activating_contexts(
        sae, llama, "resid_post.1", ids, [0, 3, 5], n=4, context=3, tokenizer=CharTokenizer()
    )
    json.dumps(out)  # serialisable as is
    z = sae.encode(site_activations(llama, "resid_post.1", ids)[:, 1:])  # default keep: t >= 1
    for latent in (0, 3):
        card = out["latents"][str(latent)]
        brute = z[..., latent].flatten().topk(4).values
        assert [e["activation"] for e in card["examples"]] == pytest.approx(
            brute.tolist(), rel=1e-5
        )
        assert card["frequency"] == pytest.approx((z[..., latent] > 0).float().mean().item())
        for e in card["examples"]:
            assert e["position"] >= 1
            assert z[e["window"], e["position"] - 1, latent].item() == pytest.approx(
                e["activation"]
            )
            token = CharTokenizer().decode([ids[e["window"], e["position"]].item()])
            assert e["tokens"][e["highlight"]] == token
            assert f"<<{token}>>" in e["text"]
    assert out["latents"]["5"] == {"frequency": 0.0, "max_activation": 0.0, "examples": []}
    with pytest.raises(ValueError, match="out of range"):
        top_activating_contexts(sae, llama, "resid_post.1", ids, [6])


# --- the real model ------------------------------------------------------------------------------
SMOLLM2 = DEFAULT_CACHE_DIR / SMOLLM2_CACHE_NAME


@pytest.mark.skipif(
    not (SMOLLM2 / "model.safetensors").is_file(), reason="SmolLM2 cache not converted yet"
)
def test_first_letter_probe_on_smollm2() -> None:
    """Layer-2 residuals of SmolLM2 encode the first letter of a word token well above chance."""
    lm = load_model(str(SMOLLM2))
    sae = build_sae("topk", d_in=576, d_sae=1152, k=16)
    out = feature_absorption(lm, sae, "resid_post.2", max_words=400, max_k=3)
    assert out["absorption_n_words"] == 400
    assert out["absorption_probe_accuracy"] > 0.2  # chance is ~1/26; measured 0.33
    if out["absorption_n_letters"] > 0:
        assert 0.0 <= out["absorption_fraction"] <= 1.0
        assert 1 <= out["absorption_mean_split_features"] <= 3


def test_splice_and_codes_use_the_units_the_sae_was_trained_in() -> None:
    """An SAE trained on normalised activations (input_scale != 1) is spliced and probed in the
    same units as the one evaluation entry point: scale_in before encode, scale_out after decode."""
    from common.evals.downstream import sae_codes, sae_reconstruction
    from common.evals.evaluate import encode_decode

    torch.manual_seed(0)
    sae = build_sae("relu", d_in=16, d_sae=32, input_scale=0.05)
    with torch.no_grad():  # biases make the SAE non-homogeneous, as trained SAEs are
        for name, p in sae.named_parameters():
            if name.startswith("b_"):
                p.normal_()
    x = 40 * torch.randn(64, 16)
    z, x_hat = encode_decode(sae, x)
    sae.eval()
    assert torch.allclose(sae_reconstruction(sae)(x), x_hat, atol=1e-5)
    assert torch.allclose(sae_codes(sae, x), z, atol=1e-6)
    assert not torch.allclose(sae.decode(sae.encode(x)), x_hat, atol=1e-3)  # the old, unscaled
