"""Datasets: offline text corpora with labels and token windows for activation extraction."""

from common.data.text import (
    CORPORA,
    Corpus,
    TokenWindows,
    fortunes,
    load_corpus,
    shakespeare,
    tokenize_windows,
    tweets,
    wordnet,
)

__all__ = [
    "CORPORA",
    "Corpus",
    "TokenWindows",
    "fortunes",
    "load_corpus",
    "shakespeare",
    "tokenize_windows",
    "tweets",
    "wordnet",
]
