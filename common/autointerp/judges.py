"""One judge interface, three backends: the explainer and the scorers only talk to a ``Judge``.

    judge.generate(messages, max_tokens=48) -> str                    # greedy, deterministic
    judge.score_choices(messages, ["yes", "no"]) -> np.ndarray       # probabilities, sum to 1

``score_choices`` reads the next-token distribution after the prompt (chat template applied,
assistant turn opened) and gives each choice the probability of its first token, summed over its
surface forms (``yes``, ``Yes``, `` yes``, `` Yes``, ...), renormalised over the choices; the
share of the whole distribution that the choices took is kept in ``last_choice_mass`` (a judge
that does not answer in the expected words shows a small mass).

Backends:

* :class:`LlamaCppJudge`: a local GGUF through llama-cpp-python (the offline default: the
  Qwen2.5-Coder-1.5B-Instruct Q4_K_M from ``assets.assemble_judge_gguf``);
* :class:`TransformersJudge`: a transformers causal LM with a chat template: a hub instruct model
  by name (read from the local cache unless ``allow_download=True``), a local folder, or a GGUF
  dequantized to fp32 by transformers (``from_gguf``; ~4 bytes per parameter of RAM, slow);
* :class:`KeywordJudge`: a deterministic stand-in for tests (explanation = the most frequent
  marked words; detection = does the excerpt contain a word of the explanation).

Both model backends keep a *prefix cache*: the tokens of the previous prompt stay in the model's
key/value cache, and a new prompt only runs the tokens after the longest common prefix. The
scorers send all excerpts of one explanation in a row, so the instructions and the explanation
are computed once per explanation. The cached and the uncached logits agree to float tolerance
(``tests/test_autointerp.py``).
"""

from __future__ import annotations

import inspect
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from common.autointerp import prompts as P

Prompt = P.Messages | str


@runtime_checkable
class Judge(Protocol):
    """What the explainer and the scorers need from a language model."""

    name: str

    def generate(self, prompt: Prompt, *, max_tokens: int = 48) -> str: ...

    def score_choices(self, prompt: Prompt, choices: Sequence[str]) -> np.ndarray: ...


def as_messages(prompt: Prompt) -> P.Messages:
    """A plain string is one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@dataclass
class JudgeStats:
    """Calls and wall time, for the report: seconds per explanation and per scored excerpt."""

    generate_calls: int = 0
    generate_seconds: float = 0.0
    generated_tokens: int = 0
    score_calls: int = 0
    score_seconds: float = 0.0
    prompt_tokens: int = 0  # tokens in all prompts
    evaluated_tokens: int = 0  # tokens actually run (the rest came from the prefix cache)

    def as_dict(self) -> dict[str, float]:
        d = dict(self.__dict__)
        d["seconds_per_generate"] = self.generate_seconds / max(self.generate_calls, 1)
        d["seconds_per_score"] = self.score_seconds / max(self.score_calls, 1)
        return d


def _surface_forms(choice: str) -> list[str]:
    base = choice.strip()
    forms = [base, base.lower(), base.capitalize(), base.upper()]
    forms += [" " + f for f in forms]
    return list(dict.fromkeys(forms))


class _CachedLM:
    """Shared machinery of the model backends: chat rendering, prefix cache, greedy decoding and
    choice scoring. Subclasses implement ``_render``, ``_encode``, ``_decode``, ``_run`` (logits
    of the last of ``ids`` given that ``ids[:n_keep]`` are already cached), ``_stop_ids``."""

    name: str = "lm"
    n_ctx: int = 4096

    def __init__(self) -> None:
        self._cached: list[int] = []
        self.stats = JudgeStats()
        self.last_choice_mass = float("nan")
        self._choice_ids: dict[tuple[str, ...], list[list[int]]] = {}

    # --- to implement ------------------------------------------------------------------------
    def _render(self, messages: P.Messages) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def _run(self, ids: list[int], n_keep: int) -> np.ndarray:
        raise NotImplementedError

    def _stop_ids(self) -> set[int]:
        raise NotImplementedError

    def _unknown_id(self) -> int | None:
        return None

    # --- shared ------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """The token ids the model sees: chat template, assistant turn opened."""
        ids = self._encode(self._render(as_messages(prompt)))
        if len(ids) >= self.n_ctx:
            raise ValueError(
                f"the prompt has {len(ids)} tokens, more than the judge's context of "
                f"{self.n_ctx}; show fewer or shorter contexts (context_len, n_top)"
            )
        return ids

    def next_logits(self, ids: list[int]) -> np.ndarray:
        """Logits (vocab,) of the token after ``ids``, reusing the cached common prefix."""
        n = 0
        for a, b in zip(self._cached, ids[:-1]):  # keep at least one token to run
            if a != b:
                break
            n += 1
        logits = self._run(ids, n)
        self._cached = list(ids)
        self.stats.prompt_tokens += len(ids)
        self.stats.evaluated_tokens += len(ids) - n
        return np.asarray(logits, dtype=np.float64)

    def reset_cache(self) -> None:
        """Forget the prefix cache (the next call runs its whole prompt)."""
        self._cached = []

    def generate(
        self, prompt: Prompt, *, max_tokens: int = 48, stop_at_newline: bool = True
    ) -> str:
        """Greedy continuation of the prompt, at most ``max_tokens`` tokens; stops at the model's
        end-of-turn tokens and, with ``stop_at_newline``, at the first newline after some text."""
        start = time.perf_counter()
        ids = self.prompt_ids(prompt)
        stops = self._stop_ids()
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(np.argmax(self.next_logits(ids + out)))
            if token in stops:
                break
            out.append(token)
            text = self._decode(out)
            if stop_at_newline and "\n" in text.strip("\n") and text.strip():
                break
        self.stats.generate_calls += 1
        self.stats.generated_tokens += len(out)
        self.stats.generate_seconds += time.perf_counter() - start
        return self._decode(out).strip()

    def choice_token_ids(self, choices: Sequence[str]) -> list[list[int]]:
        """Per choice, the first token of each of its surface forms, none shared across choices."""
        key = tuple(choices)
        if key not in self._choice_ids:
            unk = self._unknown_id()
            sets = []
            for c in choices:
                firsts = {ids[0] for f in _surface_forms(c) if (ids := self._encode(f))}
                sets.append(firsts - {unk})
            shared = {
                t for i, s in enumerate(sets) for j, o in enumerate(sets) if i != j for t in s & o
            }
            sets = [sorted(s - shared) for s in sets]
            for c, s in zip(choices, sets):
                if not s:
                    raise ValueError(
                        f"the choice {c!r} has no first token of its own in this tokenizer "
                        f"(choices {list(choices)}); use choices that start differently"
                    )
            self._choice_ids[key] = sets
        return self._choice_ids[key]

    def score_choices(self, prompt: Prompt, choices: Sequence[str]) -> np.ndarray:
        """P(choice) from the next-token distribution, renormalised over ``choices``."""
        start = time.perf_counter()
        token_sets = self.choice_token_ids(choices)
        logits = self.next_logits(self.prompt_ids(prompt))
        p = np.exp(logits - logits.max())
        p /= p.sum()
        mass = np.array([p[s].sum() for s in token_sets])
        self.last_choice_mass = float(mass.sum())
        self.stats.score_calls += 1
        self.stats.score_seconds += time.perf_counter() - start
        if mass.sum() <= 0:
            return np.full(len(choices), 1.0 / len(choices))
        return mass / mass.sum()


def _render_jinja(template: str, messages: P.Messages, bos: str, eos: str) -> str:
    """A chat template rendered as transformers does: sandboxed Jinja2, assistant turn opened."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, bos_token=bos, eos_token=eos
    )


def _without_system(messages: P.Messages) -> P.Messages:
    """For templates that refuse a system turn (Gemma): fold it into the first user turn."""
    if not messages or messages[0]["role"] != "system":
        return messages
    rest = list(messages[1:])
    if rest and rest[0]["role"] == "user":
        rest[0] = {"role": "user", "content": messages[0]["content"] + "\n\n" + rest[0]["content"]}
    else:
        rest.insert(0, {"role": "user", "content": messages[0]["content"]})
    return rest


class LlamaCppJudge(_CachedLM):
    """A GGUF instruct model run by llama-cpp-python (CPU), greedy and deterministic.

    ``model_path``: the .gguf file (``assets.assemble_judge_gguf(cache_dir)`` for the offline
    Qwen2.5-Coder-1.5B-Instruct). The chat template is the one stored in the GGUF
    (``tokenizer.chat_template``). ``n_threads`` defaults to half the CPUs, and to 1 on a machine
    with two or fewer: llama.cpp's OpenMP threads wait for each other at every layer, so on a
    shared 2-core machine two threads ran 5x *slower* per token than one (measured here: 0.9
    vs 5.1 tokens/s with other processes on the cores).
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 256,
        name: str | None = None,
    ) -> None:
        super().__init__()
        try:
            from llama_cpp import Llama
        except ImportError as err:
            raise ImportError(
                "llama-cpp-python is not installed: `pip install llama-cpp-python` (builds "
                "llama.cpp from source, ~30 min on 2 cores), or use TransformersJudge.from_gguf"
            ) from err
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no GGUF at {path}; the offline judge is assembled by "
                "common.autointerp.assets.assemble_judge_gguf(cache_dir)"
            )
        if n_threads is None:  # see the class docstring
            n_threads = 1 if (os.cpu_count() or 1) <= 2 else (os.cpu_count() or 2) // 2
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_batch=n_batch,
            verbose=False,
        )
        self.n_ctx = n_ctx
        self.name = name or path.stem
        meta = self.llm.metadata
        self._template = meta.get("tokenizer.chat_template")
        if not self._template:
            raise ValueError(f"{path} has no chat template (tokenizer.chat_template): not an "
                             "instruct model; the judge needs one")  # fmt: skip
        self._bos = self._token_text(self.llm.token_bos())
        self._eos = self._token_text(self.llm.token_eos())

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def _render(self, messages: P.Messages) -> str:
        from jinja2.exceptions import TemplateError

        try:
            return _render_jinja(self._template, messages, self._bos, self._eos)
        except TemplateError:
            return _render_jinja(self._template, _without_system(messages), self._bos, self._eos)

    def _encode(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def _decode(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def _stop_ids(self) -> set[int]:
        stops = {self.llm.token_eos()}
        eot = getattr(self.llm._model, "token_eot", None)
        if callable(eot) and eot() >= 0:
            stops.add(eot())
        for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>"):
            ids = self._encode(text)
            if len(ids) == 1:
                stops.add(ids[0])
        return stops

    def _run(self, ids: list[int], n_keep: int) -> np.ndarray:
        import llama_cpp

        llm = self.llm
        llm.n_tokens = n_keep  # Llama.eval drops the KV cache from position n_tokens on
        llm.eval(ids[n_keep:])
        # without logits_all, llama-cpp-python >= 0.3 keeps no logits itself: read the last
        # token's row from the context
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()


class TransformersJudge(_CachedLM):
    """A transformers causal LM with a chat template (hub instruct model, local folder, or GGUF).

    Build it with :meth:`from_pretrained` or :meth:`from_gguf`, or pass a model and tokenizer.
    """

    def __init__(self, model: Any, tokenizer: Any, *, name: str = "transformers") -> None:
        super().__init__()
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{name}: the tokenizer has no chat template; the judge needs an instruct model "
                "(e.g. Qwen/Qwen2.5-1.5B-Instruct) or a tokenizer with chat_template set"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.n_ctx = int(getattr(model.config, "max_position_embeddings", 4096) or 4096)
        self._cache: Any = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        allow_download: bool = False,
        device: str = "cpu",
        dtype: Any = None,
    ) -> TransformersJudge:
        """An instruct model by hub name or local folder; safetensors only, never remote code.

        A hub name is read from the local Hugging Face cache unless ``allow_download=True``."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(name_or_path).is_dir()
        offline = not allow_download and not local
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                str(name_or_path), local_files_only=offline, trust_remote_code=False
            )
            model = AutoModelForCausalLM.from_pretrained(
                str(name_or_path),
                dtype=dtype or torch.float32,
                local_files_only=offline,
                trust_remote_code=False,
                use_safetensors=True,
            )
        except OSError as err:
            hint = (
                " It is not in the local cache: pass allow_download=True on a machine with "
                "internet, or a local folder."
                if offline
                else ""
            )
            raise OSError(
                f"cannot load the judge {name_or_path!r} (safetensors weights and a tokenizer "
                f"are required).{hint} ({err})"
            ) from err
        return cls(model.to(device), tokenizer, name=str(name_or_path))

    @classmethod
    def from_gguf(cls, gguf_path: str | Path, *, name: str | None = None) -> TransformersJudge:
        """A GGUF dequantized to fp32 by transformers (``from_pretrained(dir, gguf_file=...)``):
        no llama.cpp needed, but ~4 bytes of RAM per parameter (6 GB for 1.5B) and slower."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(gguf_path)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF at {path}")
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        return cls(model, tokenizer, name=name or path.stem)

    def _render(self, messages: P.Messages) -> str:
        from jinja2.exceptions import TemplateError

        kwargs = dict(add_generation_prompt=True, tokenize=False)
        try:
            return self.tokenizer.apply_chat_template(messages, **kwargs)
        except TemplateError:
            return self.tokenizer.apply_chat_template(_without_system(messages), **kwargs)

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _unknown_id(self) -> int | None:
        return self.tokenizer.unk_token_id

    def _stop_ids(self) -> set[int]:
        stops = set()
        eos = self.tokenizer.eos_token_id
        stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        stops.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos else [])
        for text in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
            tid = self.tokenizer.convert_tokens_to_ids(text)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                stops.add(tid)
        return {int(s) for s in stops if s is not None}

    def _run(self, ids: list[int], n_keep: int) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        if self._cache is None or n_keep == 0:
            self._cache, n_keep = DynamicCache(config=self.model.config), 0
        else:
            have = self._cache.get_seq_length()
            if have > n_keep:  # transformers 5 crops by a negative count, 4.x to a length
                param = next(iter(inspect.signature(self._cache.crop).parameters))
                self._cache.crop(n_keep if param == "max_length" else n_keep - have)
        new = torch.tensor([ids[n_keep:]], device=device)
        # transformers >= 5.2x names the argument ``cache``; earlier releases past_key_values
        name = "cache" if "cache" in inspect.signature(self.model.forward).parameters else None
        kwargs = {name or "past_key_values": self._cache}
        with torch.no_grad():
            out = self.model(input_ids=new, use_cache=True, logits_to_keep=1, **kwargs)
        self._cache = getattr(out, "cache", None) or out.past_key_values
        return out.logits[0, -1].float().cpu().numpy()

    def reset_cache(self) -> None:
        super().reset_cache()
        self._cache = None


# --- the deterministic stand-in ------------------------------------------------------------
_WORD = re.compile(r"[A-Za-z0-9']+")
_STOP = {"the", "a", "an", "of", "and", "or", "to", "in", "on", "words", "word", "tokens", "token"}


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class KeywordJudge:
    """A deterministic stand-in judge with no model, for tests of the pipeline.

    * explanation: the ``n_words`` most frequent marked words, as ``tokens "w1", "w2"``;
    * detection: P(yes) = 0.9 - 0.8 * 0.3^h, h = explanation words found in the excerpt (0.1 for
      none, 0.66 for one);
    * fuzzing: the same with h = explanation words found inside the marks.

    Real explanations of token-level latents beat a random explanation with it, and it is fooled
    by close negatives (the token without its context), as a token-list explanation should be.
    """

    name = "keyword"

    def __init__(self, n_words: int = 3) -> None:
        self.n_words = n_words
        self.stats = JudgeStats()
        self.last_choice_mass = 1.0

    def generate(self, prompt: Prompt, *, max_tokens: int = 48) -> str:
        messages = as_messages(prompt)
        if P.prompt_kind(messages) != "explain":
            return ""
        counts = Counter(
            w
            for excerpt in P.parse_explain(messages)
            for span in P.marked_spans(excerpt)
            for w in _words(span)
        )
        self.stats.generate_calls += 1
        top = [w for w, _ in counts.most_common(self.n_words)]
        return "tokens " + ", ".join(f'"{w}"' for w in top) if top else "(no marked tokens)"

    @staticmethod
    def keywords(explanation: str) -> set[str]:
        quoted = re.findall(r'"([^"]+)"', explanation)
        words = _words(" ".join(quoted)) if quoted else _words(explanation)
        return {w for w in words if w not in _STOP}

    def score_choices(self, prompt: Prompt, choices: Sequence[str]) -> np.ndarray:
        messages = as_messages(prompt)
        kind = P.prompt_kind(messages)
        lowered = [c.strip().lower() for c in choices]
        if kind not in ("detect", "fuzz") or set(lowered) != {"yes", "no"}:
            return np.full(len(choices), 1.0 / len(choices))
        explanation, excerpt = P.parse_scoring(messages)
        keys = self.keywords(explanation)
        where = " ".join(P.marked_spans(excerpt)) if kind == "fuzz" else excerpt
        hits = len(keys & set(_words(where)))
        p_yes = 0.9 - 0.8 * 0.3**hits
        self.stats.score_calls += 1
        return np.array([p_yes if c == "yes" else 1.0 - p_yes for c in lowered])
