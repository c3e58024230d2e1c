"""Prompts of the explainer and of the two scorers, and the parsers that read them back.

After delphi (EleutherAI; Paulo et al. 2024, "Automatically Interpreting Millions of Features in
Large Language Models") and SAEBench's autointerp (Karvonen et al. 2025): the explainer sees
excerpts with the activating tokens between ``<<`` and ``>>`` and writes a short description;
the *detection* scorer is asked, excerpt by excerpt, whether the described feature is active in
it; the *fuzzing* scorer sees an activating excerpt whose marks are either on the tokens where
the latent fires or on random tokens, and is asked whether the marks fit the description.

Unlike delphi, which shows the scorer a batch of excerpts and parses a list of 0/1 answers, each
excerpt here is one prompt answered with ``yes`` / ``no`` and read as the probability of ``yes``
(``Judge.score_choices``): small local models follow a one-word answer far more reliably than a
list format, the probability gives an AUROC, and the shared head of the prompts (instructions +
description) is computed once per description by the judges' prefix cache, so an excerpt costs
only its own tokens.

Prompts are chat messages (``[{"role": "system", ...}, {"role": "user", ...}]``); each judge
applies its model's chat template. The parsers let the deterministic stand-in judge
(``KeywordJudge``) answer the same prompts as a real model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Messages = list[dict[str, str]]

L, R = "<<", ">>"
NEWLINE = "\\n"  # a newline inside an excerpt is shown as the two characters \n

EXPLAIN_SYSTEM = (
    "You are an interpretability researcher studying one feature of a language model. You are "
    f"shown text excerpts on which the feature is active; the tokens where it is most active are "
    f"marked {L}like this{R}. Say what the marked tokens have in common and, if it matters, what "
    "in the nearby text makes the feature fire. Answer with one short description of at most "
    "15 words and nothing else."
)
EXPLAIN_HEADER = "Excerpts:"
EXPLAIN_FOOTER = "Description of the feature:"

DESCRIPTION = "Description of the feature: "
EXCERPT = "Excerpt: "
DETECT_SYSTEM = (
    "You are an interpretability researcher. A feature of a language model is described below. "
    "You will see one text excerpt. Is the feature active somewhere in the excerpt? Answer yes "
    "if it likely is, no if it is not. Answer with one word: yes or no.\n"
)
FUZZ_SYSTEM = (
    "You are an interpretability researcher. A feature of a language model is described below. "
    f"You will see one text excerpt in which some tokens are marked {L}like this{R}. Are the "
    "marked tokens the ones the feature is active on? Answer yes if the description fits the "
    "marked tokens, no if the marks are on tokens it does not fit. Answer with one word: yes or "
    "no.\n"
)
CHOICES = ("yes", "no")


def show_token(token: str) -> str:
    """A token as it appears in a prompt: newlines as ``\\n``, marker characters kept apart."""
    return token.replace("\r", "").replace("\n", NEWLINE)


def mark(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The excerpt's text with each run of consecutive marked tokens between ``<<`` and ``>>``
    (delphi's highlighting: ``the <<big cat>> sat``). A leading space stays outside the marks."""
    out: list[str] = []
    inside = False
    for token, m in zip(tokens, marked):
        t = show_token(token)
        if m and not inside:
            stripped = t.lstrip(" ")
            out.append(t[: len(t) - len(stripped)] + L + stripped)
            inside = True
        elif not m and inside:
            out.append(R + t)
            inside = False
        else:
            out.append(t)
    if inside:
        out.append(R)
    return "".join(out)


def explain_prompt(excerpts: Sequence[str]) -> Messages:
    """The explainer's prompt for excerpts already marked with :func:`mark`."""
    body = "\n".join(f"{i + 1}. {e}" for i, e in enumerate(excerpts))
    return [
        {"role": "system", "content": EXPLAIN_SYSTEM},
        {"role": "user", "content": f"{EXPLAIN_HEADER}\n{body}\n\n{EXPLAIN_FOOTER}"},
    ]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def detection_prompt(explanation: str, excerpt: str) -> Messages:
    """Detection: is the described feature active in this (unmarked) excerpt? Answer yes / no.

    The system message (instructions, question and description) is the same for every excerpt
    of one description, so a judge's prefix cache computes it once; the user turn is only the
    excerpt, so an excerpt costs little more than its own tokens."""
    return [
        {"role": "system", "content": DETECT_SYSTEM + DESCRIPTION + _one_line(explanation)},
        {"role": "user", "content": f"{EXCERPT}{excerpt}"},
    ]


def fuzzing_prompt(explanation: str, marked_excerpt: str) -> Messages:
    """Fuzzing: are the marked tokens of this excerpt the ones the description is about?"""
    return [
        {"role": "system", "content": FUZZ_SYSTEM + DESCRIPTION + _one_line(explanation)},
        {"role": "user", "content": f"{EXCERPT}{marked_excerpt}"},
    ]


def clean_explanation(text: str) -> str:
    """The description in a model's answer: its first non-empty line (its first sentence if it
    runs on), without a leading "Description:" label, ``<<`` ``>>`` marks, enclosing quotes or a
    final period; at most 200 characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = re.sub(r"^(\*\*)?(description( of the feature)?|explanation|answer)(\*\*)?\s*:\s*", "",
                  line, flags=re.I)  # fmt: skip
    line = line.strip().strip("*").strip()
    if len(line) >= 2 and line[0] == line[-1] and line[0] in "\"'`":
        line = line[1:-1].strip()
    line = line.replace(L, "").replace(R, "")  # marks belong to excerpts, not descriptions
    if len(line) > 120 and ". " in line:  # a run-on answer: keep its first sentence
        line = line.split(". ", 1)[0]
    if line.endswith(".") and not line.endswith(".."):
        line = line[:-1]
    return line[:200] if line else "(no description)"


# --- parsers (the stand-in judge reads prompts back) ---------------------------------------------
def prompt_kind(messages: Messages | str) -> str:
    """``explain``, ``detect``, ``fuzz`` or ``other``: which builder made this prompt."""
    text = messages if isinstance(messages, str) else "\n".join(m["content"] for m in messages)
    if EXPLAIN_SYSTEM in text:
        return "explain"
    if DETECT_SYSTEM in text:
        return "detect"
    if FUZZ_SYSTEM in text:
        return "fuzz"
    return "other"


def parse_scoring(messages: Messages) -> tuple[str, str]:
    """(description, excerpt) of a detection or fuzzing prompt."""
    system, user = messages[0]["content"], messages[-1]["content"]
    description = system.split(DESCRIPTION, 1)[-1].strip()
    excerpt = user.split(EXCERPT, 1)[-1]
    return description, excerpt


def parse_explain(messages: Messages) -> list[str]:
    """The marked excerpts of an explainer prompt."""
    user = messages[-1]["content"]
    body = user.split(EXPLAIN_HEADER, 1)[-1].rsplit(EXPLAIN_FOOTER, 1)[0]
    return [re.sub(r"^\d+\. ", "", line) for line in body.strip().splitlines() if line.strip()]


def marked_spans(excerpt: str) -> list[str]:
    """The texts between ``<<`` and ``>>`` in a marked excerpt."""
    return re.findall(re.escape(L) + r"(.*?)" + re.escape(R), excerpt)
