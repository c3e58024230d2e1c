"""Offline automatic interpretability of latents (delphi / SAEBench style) with a local judge.

    from common.autointerp import build_records, run_autointerp, load_judge
    records = build_records(acts, token_ids, tokenizer, sae, n_latents=16, method="sae")
    judge = load_judge("gguf", cache_dir="data/models")      # Qwen2.5-Coder-1.5B-Instruct Q4_K_M
    result = run_autointerp(records, judge)
    print(result.table()); result.sanity

Modules: ``records`` (contexts and activations per latent, from any direction basis),
``prompts`` (explainer / detection / fuzzing prompts), ``judges`` (the Judge interface and its
llama.cpp, transformers and stand-in backends), ``scoring`` (explainer, scorers, controls,
metrics), ``pipeline`` (the whole run), ``assets`` (the offline judge GGUF), ``synthetic`` (toy
data with known latents). ``python -m common.autointerp --help``: the command line.
"""

from common.autointerp.assets import assemble_judge_gguf
from common.autointerp.judges import Judge, KeywordJudge, LlamaCppJudge, TransformersJudge
from common.autointerp.loading import load_judge
from common.autointerp.pipeline import AutointerpResult, run_autointerp
from common.autointerp.records import (
    Context,
    LatentRecord,
    build_records,
    direction_encoder,
    sae_encoder,
)
from common.autointerp.scoring import auroc, balanced_accuracy, bootstrap_ci

__all__ = [
    "AutointerpResult",
    "Context",
    "Judge",
    "KeywordJudge",
    "LatentRecord",
    "LlamaCppJudge",
    "TransformersJudge",
    "assemble_judge_gguf",
    "auroc",
    "balanced_accuracy",
    "bootstrap_ci",
    "build_records",
    "direction_encoder",
    "load_judge",
    "run_autointerp",
    "sae_encoder",
]
