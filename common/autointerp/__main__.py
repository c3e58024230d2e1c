"""``python -m common.autointerp``: explain and score a sample of latents of one or more bases.

    python -m common.autointerp --model smollm2-135m --site resid_post.12 --corpus wordnet \\
        --n-tokens 30000 --sae runs/topk/sae --basis neurons,pca --n-latents 12 \\
        --judge qwen2.5-coder-1.5b --cache-dir data/models --out metrics/autointerp.json \\
        --browser site/

Activations come from ``--acts`` / ``--token-ids`` (``.npy``; ``--sequence-ids`` optional) or,
without them, are extracted from ``--corpus`` at ``--site`` (``common.autointerp.data``). Bases:
``--sae DIR`` (``sae.encode(sae.scale_in(x))``) and ``--basis`` neurons / pca / random
(projections, read with both signs as paper 01 does). The result JSON holds the per-latent rows,
the summary (mean and bootstrap 95% CI) and the judge sanity check (real vs random explanation);
``--browser`` also writes one feature-browser page per basis and an index.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m common.autointerp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", default="smollm2-135m", help="model (for its tokenizer / extraction)")
    p.add_argument("--cache-dir", default=None, help="converted models and the judge GGUF")
    p.add_argument("--site", default="resid_post.12")
    p.add_argument("--corpus", default="wordnet")
    p.add_argument("--n-tokens", type=int, default=30000)
    p.add_argument("--window", type=int, default=64, help="extraction window (tokens)")
    p.add_argument("--acts", help=".npy (n_tokens, d) activations instead of extracting")
    p.add_argument("--token-ids", help=".npy (n_tokens,) token ids of --acts")
    p.add_argument("--sequence-ids", help=".npy (n_tokens,) window / document ids of --acts")
    p.add_argument("--sae", action="append", default=[], help="SAE folder (repeatable)")
    p.add_argument("--basis", default="", help="comma list of neurons, pca, random")
    p.add_argument("--n-latents", type=int, default=12, help="latents sampled per basis")
    p.add_argument("--context-len", type=int, default=16)
    p.add_argument("--n-top", type=int, default=8)
    p.add_argument("--n-train-quantile", type=int, default=4)
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--n-negative", type=int, default=4)
    p.add_argument("--n-close-negative", type=int, default=4)
    p.add_argument("--judge", default="qwen2.5-coder-1.5b", help="keyword, a .gguf, or a hub name")
    p.add_argument("--backend", choices=["llama_cpp", "transformers"], default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--allow-download", action="store_true")
    p.add_argument("--controls", default="random,top_tokens")
    p.add_argument("--scorers", default="detection,fuzzing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="result JSON")
    p.add_argument("--records-out", help="also write the records (JSON)")
    p.add_argument("--browser", help="also write feature-browser pages and an index here")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _bases(args: argparse.Namespace, acts: torch.Tensor) -> list[tuple[str, object, object]]:
    """(method name, encoder, decoder directions or None) for every requested basis."""
    from common.autointerp.records import direction_encoder, sae_encoder
    from common.sae.base import SAE

    out = []
    for folder in args.sae:
        sae = SAE.load(folder).eval()
        run = Path(folder).parent
        name = run.name or Path(folder).name
        if re.fullmatch(r"s\d+", name):  # a sweep run's seed folder: name the run too
            name = f"{run.parent.name}_{name}"
        out.append((f"sae:{name}", sae_encoder(sae), sae.decoder_directions.detach()))
    d = acts.shape[1]
    mean = acts.mean(0)
    gen = torch.Generator().manual_seed(args.seed)
    for name in [b.strip() for b in args.basis.split(",") if b.strip()]:
        if name == "neurons":
            dirs = torch.eye(d)
        elif name == "pca":
            _, _, v = torch.pca_lowrank(acts - mean, q=min(d, 256), center=False, niter=4)
            dirs = v.T
        elif name == "random":
            dirs = torch.nn.functional.normalize(torch.randn(d, d, generator=gen), dim=1)
        else:
            raise SystemExit(f"error: unknown basis {name!r}; choose neurons, pca or random")
        center = None if name == "neurons" else mean
        out.append((name, direction_encoder(dirs, center=center, both_signs=True),
                    torch.cat([dirs, -dirs])))  # fmt: skip
    if not out:
        raise SystemExit("error: nothing to score: pass --sae DIR and/or --basis neurons,pca")
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from common.autointerp.loading import DEFAULT_CACHE_DIR, load_judge
    from common.autointerp.pipeline import run_autointerp
    from common.autointerp.records import build_records, save_records
    from common.models.loading import load_model

    cache = args.cache_dir or DEFAULT_CACHE_DIR
    start = time.perf_counter()
    loaded = load_model(args.model, cache_dir=cache, allow_download=args.allow_download)
    if args.acts:
        if not args.token_ids:
            raise SystemExit("error: --acts needs --token-ids (the token of every row)")
        acts = torch.from_numpy(np.load(args.acts)).float()
        ids = np.load(args.token_ids)
        seq = np.load(args.sequence_ids) if args.sequence_ids else None
    else:
        from common.autointerp.data import lm_activations
        from common.data.text import load_corpus

        texts = load_corpus(args.corpus, "train", args.seed, None).texts
        acts, ids, seq = lm_activations(loaded, texts, args.site, n_tokens=args.n_tokens,
                                        context_len=args.window,
                                        progress=not args.no_progress)  # fmt: skip
    acts, ids = acts[: args.n_tokens], ids[: args.n_tokens]
    seq = None if seq is None else seq[: args.n_tokens]
    records, decoders = [], {}
    for method, encoder, directions in _bases(args, acts):
        recs = build_records(
            acts, ids, loaded.tokenizer, encoder, n_latents=args.n_latents, sequence_ids=seq,
            method=method, context_len=args.context_len, n_top=args.n_top,
            n_train_quantile=args.n_train_quantile, n_test=args.n_test,
            n_negative=args.n_negative, n_close_negative=args.n_close_negative, seed=args.seed,
        )  # fmt: skip
        records += recs
        decoders[method] = directions
    judge = load_judge(args.judge, cache_dir=cache, backend=args.backend,
                       allow_download=args.allow_download, n_threads=args.threads)  # fmt: skip
    split = [c.strip() for c in args.controls.split(",") if c.strip()]
    scorers = [s.strip() for s in args.scorers.split(",") if s.strip()]
    result = run_autointerp(records, judge, controls=split, scorers=scorers, seed=args.seed,
                            progress=not args.no_progress)  # fmt: skip
    result.timing["total_seconds"] = time.perf_counter() - start
    result.timing["n_tokens"] = int(acts.shape[0])
    result.save(args.out)
    if args.records_out:
        save_records(args.records_out, records)
    if args.browser:
        _browser(args, loaded, records, decoders, result)
    print(result.table())
    for s in result.sanity:
        lo, hi = s["real_minus_random_lo"], s["real_minus_random_hi"]
        print(f"{s['method']} {s['scorer']}: real - random AUROC {s['real_minus_random']:.3f} "
              f"[{lo:.3f}, {hi:.3f}]: {s['verdict']}")  # fmt: skip
    print(json.dumps({k: v for k, v in result.timing.items() if k != "judge_stats"}, indent=1))
    return 0


def _browser(args, loaded, records, decoders, result) -> None:  # noqa: ANN001
    from common.browser import build_index, build_sae_page, model_logit_tokens, scores_from_result
    from common.browser.build import slug

    out = Path(args.browser)
    pages = []
    for method, directions in decoders.items():
        recs = [r for r in records if r.method == method]
        logits = None
        if (
            directions is not None
            and loaded.family == "causal_lm"
            and args.site.startswith(("resid_post", "mlp_out", "attn_out"))
        ):
            try:
                logits = model_logit_tokens(loaded.model, loaded.tokenizer, directions,
                                            latents=[r.latent for r in recs])  # fmt: skip
            except ValueError as err:  # e.g. --acts from another model than --model
                print(f"warning: no promoted tokens for {method}: {err}", file=sys.stderr)
        meta = {"model": loaded.name, "weights": loaded.metadata.get("weights"),
                "site": args.site, "tokens": result.timing.get("n_tokens")}  # fmt: skip
        meta = {k: v for k, v in meta.items() if v is not None}
        page = build_sae_page(
            out / f"{slug(method)}.html", recs, title=f"{loaded.name} {args.site} {method}",
            meta=meta, logits=logits, scores=scores_from_result(result, method),
        )  # fmt: skip
        pages.append((method, page))
    build_index(out, pages, title="Feature browser", subtitle=f"{loaded.name} {args.site}")


if __name__ == "__main__":
    sys.exit(main())
