"""Extract activations at named sites into the on-disk store: one forward pass fills every site.

    python -m common.activations.extract --model smollm2-135m --sites resid_post.6,mlp_out.6 \\
        --corpus wordnet --n-tokens 100000 --context-len 128 --out data/lm/train

writes one store per site (``<out>/<site>/``, see ``common.activations.store``) and
``<out>/extraction.json``.

What ``extract`` does for each input batch:

1. ``common.hooks.capture(..., stop=True)`` on the requested sites copies the site tensors; the
   hook that completes the set raises ``hooks.StopForward``, so the layers after the deepest site
   (and the LM head) never run.
2. Tokens: a (B, T, d) site keeps the positions where ``keep`` (the batch's own mask, its
   ``attention_mask`` for padding, and ``t >= drop_first``) is true, in row-major order. SmolLM2's
   position 0 (the BOS attention sink) has a residual norm ~100x the others and would dominate an
   SAE's loss, hence ``drop_first=1`` by default. A CNN feature map (B, C, H, W) gives B*H*W
   tokens of dimension C; it has no "first position", so ``drop_first`` does not apply to it.
3. The kept rows stream to the site's ``ActivationStoreWriter`` until ``n_tokens`` per site.

Resuming: the batches must be deterministic. A writer re-opened on an unfinished store reports
``tokens_written`` (a shard boundary); the token stream of every site is a pure function of the
batches, so ``extract`` skips whole batches without a forward pass while their tokens are already
stored, and drops the already-stored head of the batch that straddles the boundary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from common import hooks
from common.hooks import tokens_from

Batch = Tensor | Mapping[str, Tensor]


@dataclass
class ExtractionResult:
    """Tokens per site in the stores at the end, and how the batches were spent."""

    tokens: dict[str, int]
    batches_run: int = 0
    batches_skipped: int = 0
    seconds: float = 0.0
    complete: dict[str, bool] = field(default_factory=dict)


def _unwrap(model: Any) -> nn.Module:
    return model.model if hasattr(model, "family") and hasattr(model, "revision") else model


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def prepare_batch(batch: Batch, drop_first: int) -> tuple[tuple, dict[str, Any], Tensor | None]:
    """Split a batch into forward ``args``/``kwargs`` and the (B, T) mask of positions to keep.

    Accepted batches: integer token ids (B, T); float images (B, C, H, W) (already preprocessed);
    or a mapping with ``input_ids`` (optional ``attention_mask``, ``keep``) or ``pixel_values``.
    keep = keep & attention_mask & (t >= drop_first); ``None`` for images (all positions kept).
    """
    if isinstance(batch, Tensor):
        batch = {"pixel_values": batch} if batch.is_floating_point() else {"input_ids": batch}
    if not isinstance(batch, Mapping):
        raise TypeError(f"a batch must be a Tensor or a mapping of Tensors, got {type(batch)}")
    if "pixel_values" in batch:
        images = batch["pixel_values"]
        if images.ndim != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        return (images,), {}, None
    if "input_ids" not in batch:
        raise ValueError(
            f"a batch mapping needs 'input_ids' or 'pixel_values', got keys {sorted(batch)}"
        )
    ids = batch["input_ids"]
    if ids.ndim != 2 or ids.is_floating_point():
        raise ValueError(f"input_ids must be integer (B, T), got {ids.dtype} {tuple(ids.shape)}")
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[:, :drop_first] = False
    if batch.get("keep") is not None:
        keep &= batch["keep"].bool()
    kwargs: dict[str, Any] = {"input_ids": ids}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
        keep &= batch["attention_mask"].bool()
    return (), kwargs, keep


def _run_sites(
    capture: hooks.Capture, model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Tensor]:
    """One forward pass until the deepest site (``hooks.StopForward``); ``{site: tensor}``."""
    capture.clear()
    try:
        model(*args, **kwargs)
    except hooks.StopForward:
        pass
    missing = [s for s, tensors in capture.tensors.items() if not tensors]
    if missing:
        raise RuntimeError(f"the forward pass never reached site(s) {missing}")
    return {s: capture.last(s) for s in capture.sites}


def _forward_kwargs(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    if "input_ids" in kwargs and hasattr(getattr(model, "config", None), "use_cache"):
        return {**kwargs, "use_cache": False}  # no KV cache for a single pass
    return kwargs


def _rows(x: Tensor, layout: str, keep: Tensor | None, drop_first: int) -> Tensor:
    """Site tensor -> (n_tokens, d) rows: kept positions of (B, T, d), or all H*W of a CNN map.

    Without a ``keep`` mask (image batches into a ViT) positions ``t >= drop_first`` are kept.
    """
    tokens = tokens_from(x, layout)
    if layout == "spatial":
        return tokens.reshape(-1, tokens.shape[-1])
    if keep is None:
        return tokens[:, drop_first:].reshape(-1, tokens.shape[-1])
    if keep.shape != tokens.shape[:2]:
        raise ValueError(
            f"keep mask {tuple(keep.shape)} does not match the site's (batch, positions) "
            f"{tuple(tokens.shape[:2])}"
        )
    return tokens[keep.to(tokens.device)]


def probe_sites(model: Any, sites: list[str], batch: Batch, drop_first: int = 1) -> dict[str, int]:
    """Width ``d`` of each site's tokens, from one forward pass on ``batch``."""
    net = _unwrap(model)
    args, kwargs, keep = prepare_batch(batch, drop_first)
    device = _device(net)
    with hooks.capture(net, sites, stop=True) as capture, torch.inference_mode():
        tensors = _run_sites(
            capture,
            net,
            tuple(a.to(device) for a in args),
            _forward_kwargs(net, {k: v.to(device) for k, v in kwargs.items()}),
        )
    return {s: tokens_from(t, capture.sites[s].layout).shape[-1] for s, t in tensors.items()}


def extract(
    model: Any,
    batches: Iterable[Batch],
    sites: list[str],
    stores: Mapping[str, Any],
    *,
    drop_first: int = 1,
    n_tokens: int | None = None,
    close: bool = True,
    progress: bool = True,
) -> ExtractionResult:
    """Run ``model`` over ``batches`` and append each site's kept tokens to ``stores[site]``.

    ``stores`` maps each site to an ``ActivationStoreWriter`` (``append``, ``tokens_written``,
    ``close``). ``n_tokens`` caps the tokens per site (default: all batches). ``close`` closes
    each writer at the end (marks the store complete). ``result.complete[site]`` is False when
    the batches ran out before ``n_tokens``.
    """
    if not sites:
        raise ValueError("no sites given; e.g. sites=['resid_post.6']")
    if len(set(sites)) != len(sites):
        raise ValueError(f"duplicate sites in {sites}")
    missing = [s for s in sites if s not in stores]
    if missing:
        raise ValueError(f"no store given for site(s) {missing}; pass stores={{site: writer}}")
    if drop_first < 0:
        raise ValueError(f"drop_first must be >= 0, got {drop_first}")
    if n_tokens is not None and n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    net = _unwrap(model)
    device = _device(net)
    target = math.inf if n_tokens is None else n_tokens
    done = {s: stores[s].tokens_written for s in sites}  # stream tokens [0, done) are stored
    finished = {s for s in sites if getattr(stores[s], "complete", False) or done[s] >= target}
    position = dict.fromkeys(sites, 0)  # stream position of the current batch's first token
    per_item: dict[str, int] = {}  # tokens per image, known after the first forward pass
    result = ExtractionResult(tokens=dict(done))
    start = time.perf_counter()

    progress_bar = tqdm(
        total=n_tokens,  # tokens per site; the bar follows the site with the fewest
        initial=int(min(min(done[s], target) for s in sites)),
        disable=not progress,
        unit="tok",
        desc="extract",
        dynamic_ncols=True,
    )
    with hooks.capture(net, sites, stop=True) as capture, progress_bar as bar:
        for batch in batches:
            if len(finished) == len(sites):
                break
            args, kwargs, keep = prepare_batch(batch, drop_first)
            layouts = {s: capture.sites[s].layout for s in sites}
            count: dict[str, int | None] = {}
            for s in sites:
                if keep is None or layouts[s] == "spatial":
                    per = per_item.get(s)
                    count[s] = None if per is None else args[0].shape[0] * per
                else:
                    count[s] = int(keep.sum())
            needed = [
                s
                for s in sites
                if s not in finished and (count[s] is None or position[s] + count[s] > done[s])
            ]
            if not needed:
                for s in sites:
                    position[s] += count[s] or 0
                result.batches_skipped += 1
                continue

            with torch.inference_mode():
                tensors = _run_sites(
                    capture,
                    net,
                    tuple(a.to(device) for a in args),
                    _forward_kwargs(net, {k: v.to(device) for k, v in kwargs.items()}),
                )
            result.batches_run += 1
            for s in sites:
                x = tensors[s]
                rows = _rows(x, layouts[s], keep, drop_first)
                if keep is None or layouts[s] == "spatial":
                    per_item[s] = len(rows) // x.shape[0]
                n, d = rows.shape
                store_d = getattr(stores[s], "d", d)
                if d != store_d:
                    raise ValueError(
                        f"site {s} gives {d}-dimensional tokens but its store was opened with "
                        f"d={store_d}; open the writer with d={d} (probe_sites tells the widths)"
                    )
                if s not in finished:
                    skip = max(0, done[s] - position[s])
                    take = int(min(n - skip, target - done[s]))
                    if take > 0:
                        stores[s].append(rows[skip : skip + take])
                        done[s] += take
                    if done[s] >= target:
                        finished.add(s)
                position[s] += n
            bar.update(int(min(min(done[s], target) for s in sites)) - bar.n)
    if close:
        for s in sites:
            if not getattr(stores[s], "complete", False) and done[s] > 0:
                stores[s].close()
    result.tokens = dict(done)
    result.complete = {s: n_tokens is None or done[s] >= target for s in sites}
    result.seconds = time.perf_counter() - start
    return result


def window_batches(
    ids: Tensor, keep: Tensor | None, batch_size: int
) -> Iterator[dict[str, Tensor]]:
    """Fixed, ordered batches of token windows (``common.data.text.tokenize_windows`` output)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    for i in range(0, len(ids), batch_size):
        batch = {"input_ids": ids[i : i + batch_size]}
        if keep is not None:
            batch["keep"] = keep[i : i + batch_size]
        yield batch


# --- command line --------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m common.activations.extract",
        description="Extract activations of a text model at named sites into on-disk stores.",
    )
    p.add_argument("--model", default="smollm2-135m", help="built-in name, folder or hub name")
    p.add_argument("--sites", required=True, help="comma-separated, e.g. resid_post.6,mlp_out.6")
    p.add_argument("--corpus", default="wordnet", help="wordnet, fortunes, shakespeare, tweets")
    p.add_argument("--split", default="train")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-docs", type=int, default=None)
    p.add_argument("--n-tokens", type=int, required=True, help="tokens per site")
    p.add_argument("--context-len", type=int, default=128)
    p.add_argument("--drop-first", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--shard-tokens", type=int, default=65536)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", default=None, help="where converted models are cached")
    p.add_argument(
        "--allow-download", action="store_true", help="let transformers fetch hub models"
    )
    p.add_argument("--out", required=True, help="output folder; one store per site inside")
    p.add_argument(
        "--keep-separators",
        action="store_true",
        help="keep the BOS separators between documents inside a window (dropped by default: "
        "like position 0 they are attention sinks with ~100x residual norm in SmolLM2)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _windows_for(texts: list[str], tokenizer: Any, args: argparse.Namespace) -> tuple[Any, Tensor]:
    """Enough token windows for ``--n-tokens`` kept tokens (or the whole corpus), and the mask.

    Windows are a prefix of the same token stream whatever their number, so batches are the same
    from run to run (resuming is exact). Unless ``--keep-separators``, the in-window document
    separators (the token every window starts with) are masked out too.
    """
    from common.data.text import tokenize_windows

    n_windows = math.ceil(args.n_tokens / (args.context_len - args.drop_first)) + 1
    while True:
        windows = tokenize_windows(
            texts, tokenizer, args.context_len, drop_first=args.drop_first, max_windows=n_windows
        )
        keep = windows.keep
        if not args.keep_separators:
            keep = keep & (windows.ids != windows.ids[:, :1])
        kept = int(keep.sum())
        if kept >= args.n_tokens or len(windows.ids) < n_windows:  # enough, or corpus exhausted
            return windows, keep
        n_windows = math.ceil(n_windows * args.n_tokens / max(kept, 1)) + 1


def main(argv: list[str] | None = None) -> int:
    """The command line; bad input (a device this machine lacks, a damaged store to resume, an
    unknown site) ends with ``error: ...`` and the fix, not a traceback."""
    args = _parse(argv)
    try:
        return _run(args)
    except (ValueError, FileNotFoundError, KeyError) as err:  # CorruptStoreError is a ValueError
        raise SystemExit(f"error: {err}") from err


def _run(args: argparse.Namespace) -> int:
    from common.activations.store import ActivationStoreWriter
    from common.data.text import load_corpus
    from common.device import resolve_device
    from common.models.loading import DEFAULT_CACHE_DIR, load_model

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    if args.n_tokens <= 0:
        raise SystemExit(f"--n-tokens must be positive, got {args.n_tokens}")
    resolve_device(args.device, key="--device")  # before the model is loaded
    loaded = load_model(
        args.model,
        cache_dir=args.cache_dir or DEFAULT_CACHE_DIR,
        allow_download=args.allow_download,
    )
    if loaded.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer: this command extracts text models only")
    loaded.model.to(args.device)
    for site in sites:
        hooks.resolve_site(loaded.model, site)  # fail early, with the list of valid sites

    corpus = load_corpus(args.corpus, args.split, args.seed, args.max_docs)
    windows, keep = _windows_for(corpus.texts, loaded.tokenizer, args)
    widths = probe_sites(loaded, sites, {"input_ids": windows.ids[:1]}, args.drop_first)
    out = Path(args.out)
    metadata = {
        "model": loaded.name,
        "revision": loaded.revision,
        "weights": loaded.metadata.get("weights"),
        "family": loaded.family,
        "corpus": args.corpus,
        "split": args.split,
        "seed": args.seed,
        "max_docs": args.max_docs,
        "context_len": args.context_len,
        "drop_first": args.drop_first,
        "drop_separators": not args.keep_separators,
        "n_tokens_target": args.n_tokens,
    }
    stores = {
        s: ActivationStoreWriter(
            out / s,
            d=widths[s],
            dtype=args.dtype,
            shard_tokens=args.shard_tokens,
            metadata={**metadata, "site": s},
        )
        for s in sites
    }
    result = extract(
        loaded,
        window_batches(windows.ids, keep, args.batch_size),
        sites,
        stores,
        drop_first=args.drop_first,
        n_tokens=args.n_tokens,
        progress=not args.no_progress,
    )
    summary = {
        **metadata,
        "sites": {s: {"d": widths[s], "n_tokens": result.tokens[s]} for s in sites},
        "dtype": args.dtype,
        "batches_run": result.batches_run,
        "batches_skipped": result.batches_skipped,
        "seconds": round(result.seconds, 2),
        "tokens_per_second": round(
            sum(result.tokens.values()) / len(sites) / max(result.seconds, 1e-9), 1
        ),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "extraction.json").write_text(json.dumps(summary, indent=1) + "\n")
    short = [s for s in sites if not result.complete[s]]
    if short:
        print(
            f"warning: the corpus ran out: {short} have {[result.tokens[s] for s in short]} "
            f"tokens, fewer than --n-tokens {args.n_tokens}; raise --max-docs or use a larger "
            "corpus",
            file=sys.stderr,
        )
    print(json.dumps(summary["sites"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
