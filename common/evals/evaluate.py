"""The one evaluation entry point: an SAE and activations in, one flat metrics dict out.

    python -m common.evals.evaluate --sae runs/toy/relu/sae --data data/toy/toy.safetensors \
        --key x --features-key features --out metrics/toy/relu.json

Reconstruction and sparsity metrics always; ground-truth recovery when the true features are given
(toy data). Later metrics (downstream loss, absorption, probing) plug in here as further sections.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor

from common.evals.ground_truth import random_dictionary_baseline, recovery_metrics
from common.evals.reconstruction import reconstruction_metrics
from common.evals.sparsity import log_frequency_histogram, sparsity_metrics
from common.sae import SAE


def check_width(sae: SAE, x: Tensor, source: str = "activations") -> None:
    """``x`` must be ``(..., d_in)`` with the SAE's ``d_in``: a ValueError naming both otherwise."""
    width = x.shape[-1] if x.ndim else None
    if width != sae.cfg.d_in:
        raise ValueError(
            f"{source}: the activations have width {width} (shape {tuple(x.shape)}), but the "
            f"{sae.name} SAE has d_in={sae.cfg.d_in}. Did you pass the activations of the site "
            "the SAE was trained on (and the right --key)?"
        )


@torch.no_grad()
def encode_decode(sae: SAE, x: Tensor, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
    """``(z, x_hat)`` for all of ``x`` (raw units; ``input_scale`` applied), in eval mode."""
    check_width(sae, x)
    was_training = sae.training
    sae.eval()
    zs, x_hats = [], []
    for chunk in x.split(batch_size):
        z = sae.encode(sae.scale_in(chunk))
        zs.append(z)
        x_hats.append(sae.scale_out(sae.decode(z)))
    sae.train(was_training)
    return torch.cat(zs), torch.cat(x_hats)


def evaluate(
    sae: SAE,
    x: Tensor,
    *,
    true_features: Tensor | None = None,
    with_histogram: bool = False,
    source: str = "activations",
) -> dict[str, float | dict]:
    """Reconstruction + sparsity (+ ground-truth recovery) of ``sae`` on activations ``x``.

    ``source`` (the file ``x`` came from) is named in the error when a width does not match the
    SAE's ``d_in``.
    """
    check_width(sae, x, source)
    if true_features is not None and true_features.shape[-1] != sae.cfg.d_in:
        raise ValueError(
            f"{source}: the true features have shape {tuple(true_features.shape)}, but the "
            f"{sae.name} SAE has d_in={sae.cfg.d_in}. Pass the features of the data the SAE was "
            "trained on (--features-key)."
        )
    z, x_hat = encode_decode(sae, x)
    metrics: dict[str, float | dict] = {
        "architecture": sae.name,  # type: ignore[dict-item]
        "d_sae": sae.cfg.d_sae,
        **reconstruction_metrics(x, x_hat),
        **sparsity_metrics(z),
    }
    if true_features is not None:
        metrics.update(recovery_metrics(true_features, sae.decoder_directions))
        baseline = random_dictionary_baseline(true_features, sae.cfg.d_sae)
        metrics.update({f"random_{k}": v for k, v in baseline.items()})
    if with_histogram:
        metrics["log_frequency_histogram"] = log_frequency_histogram(z)
    return metrics


def evaluate_downstream(
    sae: SAE,
    *,
    model: str,
    site: str,
    corpus: str,
    n_windows: int,
    context_len: int,
    seed: int = 0,
    cache_dir: str | None = None,
) -> dict[str, float]:
    """CE / KL loss recovered with ``sae`` spliced into ``model`` at ``site`` (see downstream.py).

    The windows come from the corpus's *test* split, tokenised like the extraction (first position
    and in-window document separators excluded), so the spliced tokens are those the SAE saw.
    """
    from common.data.text import load_corpus, tokenize_windows
    from common.evals.downstream import downstream_loss
    from common.models.loading import load_model

    kwargs = {"cache_dir": cache_dir} if cache_dir else {}
    loaded = load_model(model, **kwargs)
    texts = load_corpus(corpus, "test", seed=seed).texts
    windows = tokenize_windows(texts, loaded.tokenizer, context_len, max_windows=n_windows)
    keep = windows.keep & (windows.ids != windows.ids[:, :1])
    metrics = downstream_loss(loaded.model, sae, site, windows.ids, keep_mask=keep)
    return {f"downstream_{k}": float(v) for k, v in metrics.items()}


def main(argv: list[str] | None = None) -> None:
    from common.activations.files import load_activation_file, load_activations

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--sae", required=True, help="folder written by SAE.save (config.json + sae.safetensors)"
    )
    p.add_argument("--data", required=True, help=".npy / .safetensors file or activation store")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate on the first N tokens")
    p.add_argument("--key", default=None, help="tensor name in a multi-tensor .safetensors file")
    p.add_argument("--features-key", default=None, help="tensor with the true features (toy data)")
    p.add_argument("--out", required=True, help="metrics JSON to write")
    lm = p.add_argument_group("downstream loss (language models): splice the SAE into the model")
    lm.add_argument("--model", default=None, help="e.g. smollm2-135m; enables CE/KL recovered")
    lm.add_argument("--site", default=None, help="hook site the SAE was trained on")
    lm.add_argument("--corpus", default="wordnet", help="text corpus (its test split)")
    lm.add_argument("--downstream-windows", type=int, default=16)
    lm.add_argument("--context-len", type=int, default=128)
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--cache-dir", default=None, help="where converted models are cached")
    args = p.parse_args(argv)
    try:
        sae = SAE.load(args.sae)
        x = load_activations(args.data, key=args.key, max_tokens=args.max_tokens)
        features = (
            load_activation_file(args.data, key=args.features_key) if args.features_key else None
        )
        metrics = evaluate(sae, x, true_features=features, source=str(args.data))
        if args.model:
            if not args.site:
                raise ValueError("--model needs --site: the hook site the SAE was trained on")
            metrics.update(
                evaluate_downstream(
                    sae,
                    model=args.model,
                    site=args.site,
                    corpus=args.corpus,
                    n_windows=args.downstream_windows,
                    context_len=args.context_len,
                    seed=args.seed,
                    cache_dir=args.cache_dir,
                )
            )
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        raise SystemExit(f"error: {err}") from err
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
