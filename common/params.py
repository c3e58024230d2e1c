"""Validation of ``params.yaml`` before any work, and switching between profiles.

Every key of ``params.yaml`` is declared in ``SCHEMA`` with the kind of value it takes. A typo, a
wrong type or a negative budget fails at once with the dotted key, the value found and the value
expected; ``check_params`` is the first stage of the pipeline and every other stage depends on its
output (``data/params_valid.json``), so nothing runs on a malformed file.

What is checked where: ``validate_params`` checks the file itself (types, ranges, the names of
models, hook sites and devices) and is what tests and ``use`` run, on any machine. Whether a device
exists here (``cuda`` needs a GPU) is a property of the machine that does the work, so only the
``check`` command verifies it (``common.device.resolve_device``), unless given ``--no-hardware``.

Every reader of ``params.yaml`` parses it with ``load_yaml``: PyYAML's safe loader plus YAML 1.2's
exponent floats, so ``lr: 1e-3`` is the number 0.001 (as DVC, which reads YAML 1.2, sees it) and
not the string '1e-3'. Numbers must be finite: ``.inf`` and ``.nan`` are rejected everywhere.

    python -m common.params check         # validate params.yaml, and its devices on this machine
    python -m common.params check --no-hardware   # validate it for another machine (no devices)
    python -m common.params use smoke     # params.yaml <- profiles/default.yaml + smoke.yaml
    python -m common.params use default   # back to the embedded default profile
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

Check = Callable[[Any], bool]
ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"


class ParamsError(ValueError):
    """A value in params.yaml is malformed; the message names the key and what is expected."""


class _ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2's exponent floats (``1e-3``, ``5E-4``).

    YAML 1.1 (PyYAML) needs a dot and a signed exponent, so ``1e-3`` loads as the string '1e-3'.
    The resolver is added after PyYAML's own ones: whatever loaded before loads to the same value.
    """


_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse ``params.yaml``-style YAML: ``yaml.safe_load`` plus YAML 1.2 floats such as 1e-3."""
    return yaml.load(text, Loader=_ParamsLoader)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite int or float (not a bool): inf and nan are never a valid budget or coefficient."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_number(text: str) -> int | float | None:
    """The finite number a numeric-looking string means ('1e-3' -> 0.001, '1e4' -> 10000)."""
    try:
        number = float(text.strip().replace("_", ""))
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    return int(number) if number.is_integer() else number


_EXPECTS_NUMBER = re.compile(r"\b(?:number|integer|digit|cosine)s?\b")


def _hint(value: Any, expected: str) -> str:
    """The fix for what a person plausibly wrote: a quoted number, inf / nan, 1e4 for an integer."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(x, float) and not math.isfinite(x) for x in items):
        return "; inf and nan are not accepted: write a finite number"
    if not _EXPECTS_NUMBER.search(expected) or "string" in expected:
        return ""
    for x in items:
        number = _as_number(x) if isinstance(x, str) else None
        if number is not None:
            return f"; {x!r} is a string: write it as a number, without quotes, e.g. {number!r}"
        if isinstance(x, float) and x.is_integer() and "integer" in expected:
            return f"; write {x!r} as an integer, e.g. {int(x)}"
    return ""


def _fail(key: str, value: Any, expected: str, why: str = "") -> ParamsError:
    """The error for ``key``: the value found, the value expected, and why or how to fix it."""
    return ParamsError(f"params.yaml: `{key}` must be {expected}, got {value!r}{why}")


# Leaf validators: (predicate, description of the expected value).
POS_INT = (lambda v: _is_int(v) and v > 0, "a positive integer")
NONNEG_INT = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
POS_FLOAT = (lambda v: _is_number(v) and v > 0, "a positive number")
NONNEG_FLOAT = (lambda v: _is_number(v) and v >= 0, "a number >= 0")
PROBABILITY = (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
FRACTION = (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]")
STRING = (lambda v: isinstance(v, str) and v != "", "a non-empty string")
BOOL = (lambda v: isinstance(v, bool), "true or false")
SEEDS = (
    lambda v: (
        isinstance(v, list)
        and len(v) >= 3
        and all(_is_int(s) and s >= 0 for s in v)
        and len(set(v)) == len(v)
    ),
    "a list of at least 3 distinct integers >= 0 (claims are checked over seeds)",
)


def list_of(check: tuple[Check, str], min_len: int = 1) -> tuple[Check, str]:
    """A list of at least ``min_len`` values that each pass ``check``."""
    return (
        lambda v: isinstance(v, list) and len(v) >= min_len and all(check[0](x) for x in v),
        f"a list of at least {min_len} values, each {check[1]}",
    )


def one_of(*choices: str) -> tuple[Check, str]:
    return (lambda v: v in choices, f"one of {list(choices)}")


# --- devices: the name here, whether the hardware exists in `check_hardware` -------------------
DEVICE = (
    lambda v: isinstance(v, str) and re.fullmatch(r"cpu|cuda(?::[0-9]+)?|mps", v) is not None,
    "a torch device: 'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'",
)


# --- models: a built-in name, a local folder or a hub id, checked without loading anything -------
# Built-in models (common.models.loading.BUILTIN_MODELS) -> (their site vocabulary, their number of
# blocks), so that a site's layer is checked before any model is converted or loaded. The tests
# check these numbers against the shipped assets.
BUILTIN_LAYERS: dict[str, tuple[str, int]] = {
    "smollm2-135m": ("transformer", 30),
    "gemma3-270m": ("transformer", 18),
    "minilm-l6": ("transformer", 6),
    "efficientnet-lite0": ("cnn", 16),
}
# Hub models from before namespaces (no ``owner/``) that the supported model types include.
ROOT_HUB_MODELS = (
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "distilgpt2",
    "bert-base-uncased",
    "bert-base-cased",
    "bert-large-uncased",
    "bert-large-cased",
)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# A value starting with one of these folders names a local folder (a pipeline output), not a hub id.
LOCAL_ROOTS = ("runs", "data", "outputs", "metrics", "papers", "profiles")


def _hf_cached_config(repo_id: str) -> Path | None:
    """``config.json`` of ``repo_id`` in the local Hugging Face cache, if it is there."""
    hub = os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snapshots = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return next(iter(sorted(snapshots.glob("*/config.json"))), None)


def _model_error(
    value: Any,
    builtins: tuple[str, ...],
    outputs: tuple[str, ...],
    roots: tuple[str, ...],
    needs_config: bool,
) -> str | None:
    """Why ``value`` names no model (see ``model_spec``), or None; nothing is loaded."""
    if not isinstance(value, str) or not value.strip():
        return ": a model is named by a non-empty string"
    if value in builtins or value in outputs:
        return None
    known = [*builtins, *outputs, *roots]
    close = difflib.get_close_matches(value, known, n=1, cutoff=0.6)
    did_you_mean = f" (did you mean {close[0]!r}?)" if close else ""
    path = Path(value).expanduser()
    if path.is_dir():
        if needs_config and not (path / "config.json").is_file():
            return f": the folder {value} has no config.json (write one with save_pretrained)"
        return None
    if path.exists():
        return f": {value} is a file; name the folder that holds config.json and the weights"
    if value.startswith((".", "/", "~")) or Path(value).parts[0] in LOCAL_ROOTS:
        return f": the folder {value} does not exist{did_you_mean}"
    if HUB_ID.fullmatch(value) or value in roots or (roots and _hf_cached_config(value)):
        return None
    builtin = "not a built-in model, " if builtins else ""
    return f": {builtin}no such folder, and not a hub id 'owner/name'{did_you_mean}"


def model_spec(
    what: str,
    *,
    builtins: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    roots: tuple[str, ...] = (),
    needs_config: bool = False,
    example: str,
) -> Callable[[Any, str], None]:
    """A leaf for a model name: one of ``builtins``, a pipeline output (``outputs``, which may not
    exist yet), a local folder that exists, or a hub id shaped ``owner/name`` such as ``example``
    (or a namespace-less hub model in ``roots`` or in the local cache), which must be in the local
    Hugging Face cache when the work runs (the pipeline never downloads)."""
    forms = [f"one of {list(outputs)} (a pipeline output)"] if outputs else []
    forms += [f"a built-in model {list(builtins)}"] if builtins else []
    forms += [
        "a local folder" + (" with config.json" if needs_config else ""),
        f"a hub id 'owner/name' (e.g. {example!r}"
        + (f", or {roots[0]!r} without an owner)" if roots else ")"),
    ]
    expected = f"{what}: " + ", ".join(forms)

    def check(value: Any, key: str) -> None:
        why = _model_error(value, builtins, outputs, roots, needs_config)
        if why is not None:
            raise _fail(key, value, expected, why)

    return check


def _lm_model(value: Any, key: str) -> None:
    """``lm.model``: a text model (the built-ins with transformer sites), a folder or a hub id."""
    from common.models.loading import BUILTIN_MODELS

    text = tuple(n for n in BUILTIN_MODELS if BUILTIN_LAYERS.get(n, ("transformer",))[0] != "cnn")
    if value in BUILTIN_MODELS and value not in text:
        raise _fail(key, value, f"a text model such as {list(text)}", ": it is a vision model")
    check = model_spec(
        "a text model",
        builtins=text,
        roots=ROOT_HUB_MODELS,
        needs_config=True,
        example="EleutherAI/pythia-70m",
    )
    check(value, key)


def _n_layers(spec: str) -> int | None:
    """The number of blocks of model ``spec`` when known without loading it: a built-in, or the
    config.json of a local folder or of a hub model in the local cache; else None."""
    if spec in BUILTIN_LAYERS:
        return BUILTIN_LAYERS[spec][1]
    config: Path | None = Path(spec).expanduser() / "config.json"
    if config is None or not config.is_file():
        config = _hf_cached_config(spec)
    if config is None:
        return None
    data = json.loads(config.read_text())
    for source in (data, data.get("text_config") or {}):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            if _is_int(source.get(name)):
                return source[name]
    return None


# --- hook sites: the vocabulary of common.models.sites (and common.models.diffusion's U-Net) ---
TRANSFORMER_SITES = (
    "a hook site '<kind>.<layer>' with kind one of resid_post, mlp_out, attn_z, mlp_hidden "
    "(e.g. 'resid_post.6', 'mlp_out.6', 'attn_z.3', 'mlp_hidden.3'; common.models.sites)"
)
UNET_SITE = re.compile(r"unet\.(?:(?:down|up)_blocks\.[0-9]+|mid_block)\.attentions\.[0-9]+")
UNET_SITES = (
    "a U-Net cross-attention block 'unet.down_blocks.I.attentions.J', "
    "'unet.mid_block.attentions.J' or 'unet.up_blocks.I.attentions.J' "
    "(e.g. 'unet.up_blocks.0.attentions.1'; common.models.diffusion)"
)


def _transformer_site(value: Any, key: str) -> None:
    """A transformer site by name; its layer is checked against ``lm.model`` in ``_lm_layers``."""
    from common.models.sites import site_name_error

    why = site_name_error(value)
    if why is not None:
        raise _fail(key, value, TRANSFORMER_SITES, f": {why}")


def _efficientnet_sites(value: Any, key: str) -> None:
    """At least two distinct EfficientNet-Lite0 sites (paper 21 compares them as "models")."""
    from common.models.sites import site_name_error

    n = BUILTIN_LAYERS["efficientnet-lite0"][1]
    expected = (
        f"a list of >= 2 distinct EfficientNet-Lite0 sites, 'block.L' (L = 0..{n - 1}) or "
        "'features' (e.g. [block.10, features])"
    )
    if not isinstance(value, list) or len(value) < 2 or len(set(map(str, value))) != len(value):
        raise _fail(key, value, expected)
    for site in value:
        why = site_name_error(site, cnn=True, n_layers=n)
        if why is not None:
            raise _fail(key, value, expected, f": {why}")


def _unet_site_error(site: Any) -> str | None:
    """Why ``site`` is not a U-Net site name (the U-Net itself checks that the block exists)."""
    if isinstance(site, str) and UNET_SITE.fullmatch(site):
        return None
    prefixed = UNET_SITE.fullmatch(f"unet.{site}") is not None
    return f": {site!r} is not one" + (f" (did you mean 'unet.{site}'?)" if prefixed else "")


def _unet_site(value: Any, key: str) -> None:
    why = _unet_site_error(value)
    if why is not None:
        raise _fail(key, value, UNET_SITES, why)


def _unet_sites(value: Any, key: str) -> None:
    expected = f"'auto' or a non-empty list, each {UNET_SITES}"
    if value == "auto":
        return
    if not isinstance(value, list) or not value:
        raise _fail(key, value, expected)
    for site in value:
        why = _unet_site_error(site)
        if why is not None:
            raise _fail(key, value, expected, why)


def _sae_hyperparameters(value: Any, key: str) -> None:
    """``{run_name: {architecture: ..., hyperparameter: value}}``, checked against the registry.

    ``architecture`` defaults to the run name, so ``relu: {l1_coefficient: 1e-3}`` is a ReLU SAE
    and ``topk_no_aux: {architecture: topk, aux_coefficient: 0}`` a TopK SAE without AuxK.
    """
    from common.sae import available_architectures, get_architecture

    if not isinstance(value, dict) or not value:
        raise ParamsError(f"params.yaml: `{key}` must map run names to SAE hyperparameters")
    for run, hyper in value.items():
        if not isinstance(hyper, dict):
            raise ParamsError(f"params.yaml: `{key}.{run}` must be a mapping of hyperparameters")
        arch = hyper.get("architecture", run)
        if arch not in available_architectures():
            raise ParamsError(
                f"params.yaml: `{key}.{run}`: unknown architecture {arch!r}; valid: "
                f"{available_architectures()} (add `architecture: <name>` to a custom run name)"
            )
        config_class = get_architecture(arch).config_class
        fields = {f.name for f in dataclasses.fields(config_class)} - {"d_in"}
        unknown = sorted(set(hyper) - fields - {"architecture"})
        if unknown:
            raise ParamsError(
                f"params.yaml: `{key}.{run}`: unknown hyperparameter(s) {unknown} for {arch!r}; "
                f"valid: {sorted(fields)}"
            )
        for name, v in hyper.items():
            items = v if isinstance(v, list) else [v]
            if any(
                isinstance(x, float)
                and not math.isfinite(x)
                or isinstance(x, str)
                and _as_number(x) is not None
                for x in items
            ):
                raise _fail(f"{key}.{run}.{name}", v, "a finite number", _hint(v, "a number"))
        try:
            config_class(d_in=1, **{k: v for k, v in hyper.items() if k != "architecture"})
        except (TypeError, ValueError) as err:
            raise ParamsError(f"params.yaml: `{key}.{run}`: {err}") from err


AT_LEAST_2 = (lambda v: _is_int(v) and v >= 2, "an integer >= 2")
INT_LIST_STRING = (
    lambda v: isinstance(v, str) and all(p.strip().isdigit() and int(p) > 0 for p in v.split(",")),
    'a comma-separated string of positive integers, e.g. "1,5"',
)


def _is_architecture_list(value: Any) -> bool:
    from common.sae import available_architectures

    names = value.split(",") if isinstance(value, str) else []
    return bool(names) and all(n.strip() in available_architectures() for n in names)


ARCHITECTURE_LIST = (
    _is_architecture_list,
    "a comma-separated string of registry names (common.sae.available_architectures())",
)
AT_LEAST_50 = (lambda v: _is_int(v) and v >= 50, "an integer >= 50")
PREFIX_FRACTIONS = (
    lambda v: (
        isinstance(v, list)
        and len(v) > 0
        and all(_is_number(f) and 0 < f <= 1 for f in v)
        and all(a < b for a, b in zip(v, v[1:], strict=False))
        and v[-1] == 1
    ),
    "an increasing list of numbers in (0, 1] ending at 1.0",
)


def _paper_folders(value: Any, key: str) -> None:
    """Folder names under ``papers/`` that exist and declare their claims in ``claims.yaml``."""
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ParamsError(f"params.yaml: `{key}` must be a non-empty list of papers/ folder names")
    for folder in value:
        if not (ROOT / "papers" / folder / "claims.yaml").is_file():
            have = sorted(p.parent.name for p in (ROOT / "papers").glob("*/claims.yaml"))
            raise ParamsError(
                f"params.yaml: `{key}`: papers/{folder}/claims.yaml does not exist; "
                f"folders with claims: {have}"
            )


# The in-notebook training budget shared by the papers that sweep a ReLU + L1 baseline (02, 07).
IMAGE_DATASETS = (
    lambda v: isinstance(v, list) and bool(v) and set(v) <= {"fashion-mnist", "digits"},
    "a non-empty list drawn from ['fashion-mnist', 'digits']",
)

# The diffusion papers' model, scorer and prompts: the pipeline's own 16x16 model and CNN by
# default, a hub pipeline (e.g. stabilityai/sdxl-turbo) and a CLIP (zero-shot) in the GPU profile.
DIFFUSION_MODELS: dict[str, Any] = {
    "diffusion": model_spec(
        "a diffusion model", outputs=("runs/diffusion",), example="stabilityai/sdxl-turbo"
    ),
    "scorer": model_spec(
        "an image scorer (a classifier or a CLIP)",
        outputs=("runs/classifier", "runs/clip_style"),
        example="openai/clip-vit-base-patch16",
    ),
    "class_names": list_of(STRING, min_len=0),
    "device": DEVICE,
}

RELU_SWEEP_BUDGET: dict[str, Any] = {
    "train_tokens": POS_INT,
    "eval_tokens": POS_INT,
    "d_sae": POS_INT,
    "steps": POS_INT,
    "batch_size": POS_INT,
    "lr": POS_FLOAT,
    "lr_warmup_steps": NONNEG_INT,
    "l1_warmup_steps": NONNEG_INT,
    "relu_l1": list_of(POS_FLOAT, min_len=2),
}

TRAIN_SCHEMA: dict[str, Any] = {
    "steps": POS_INT,
    "batch_size": POS_INT,
    "lr": POS_FLOAT,
    "lr_warmup_steps": NONNEG_INT,
    "lr_decay_fraction": FRACTION,
    "dead_after_tokens": POS_INT,
    "normalize_activations": BOOL,
    "device": DEVICE,
    "saes": _sae_hyperparameters,
}

SCHEMA: dict[str, Any] = {
    "seed": NONNEG_INT,
    "toy": {
        "generator": one_of("superposition", "hierarchical", "correlated", "known_magnitudes"),
        "n_samples": POS_INT,
        "n_features": POS_INT,
        "d": POS_INT,
        "p_active": PROBABILITY,
    },
    "toy_train": TRAIN_SCHEMA,
    "lm": {
        "model": _lm_model,
        "site": _transformer_site,
        "mlp_site": _transformer_site,
        "corpus": one_of("wordnet", "fortunes", "shakespeare", "tweets"),
        "context_len": POS_INT,
        "train_tokens": POS_INT,
        "eval_tokens": POS_INT,
        "downstream_windows": POS_INT,
        "batch_size": POS_INT,
        "dtype": one_of("float32", "float16", "bfloat16"),
        "device": DEVICE,
    },
    "lm_train": TRAIN_SCHEMA,
    "compare": {
        "title": STRING,
    },
    "clip_style": {
        "n_train": POS_INT,
        "n_test": POS_INT,
        "image_size": (lambda v: _is_int(v) and v >= 32, "an integer >= 32"),
        "epochs": POS_INT,
        "d_embed": POS_INT,
    },
    "diffusion": {
        "steps": POS_INT,
        "batch_size": POS_INT,
        "lr": POS_FLOAT,
        "p_uncond": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
        "sample_per_class": POS_INT,
        "sample_steps": INT_LIST_STRING,
    },
    "classifier": {
        "epochs": POS_FLOAT,
        "n_train": POS_INT,
    },
    "papers": {
        "seeds": SEEDS,
        "folders": _paper_folders,
        "clip": model_spec(
            "a CLIP", outputs=("runs/clip_style",), example="openai/clip-vit-base-patch16"
        ),
        "01_cunningham": {
            "train_tokens": POS_INT,
            "expansion": POS_INT,
            "l1_coefficient": POS_FLOAT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "baseline_tokens": POS_INT,
            "n_components": POS_INT,
            "ica_max_iter": POS_INT,
            "n_top_docs": POS_INT,
            "probe_ks": list_of(POS_INT),
            "probe_tasks": POS_INT,
            "probe_min_class_size": (lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
        },
        "02_gated": {
            **RELU_SWEEP_BUDGET,
            "gated_l1": list_of(POS_FLOAT, min_len=2),
            "downstream_windows": NONNEG_INT,
        },
        "07_topk": {
            **RELU_SWEEP_BUDGET,
            "topk_k": list_of(POS_INT, min_len=2),
            "width_k": POS_INT,
            "widths": list_of(POS_INT, min_len=2),
            "dead_after_tokens": POS_INT,
        },
        "14_patch_sae": {
            "datasets": IMAGE_DATASETS,
            "n_images": POS_INT,
            "n_test": POS_INT,
            "expansion": POS_INT,
            "l1_coefficient": POS_FLOAT,
            "l1_warmup_steps": NONNEG_INT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "threshold": NONNEG_FLOAT,
            "top_k": POS_INT,
            "selective_fraction": PROBABILITY,
            "n_heatmap_latents": POS_INT,
            "n_heatmap_images": POS_INT,
            "extract_batch_size": POS_INT,
        },
        "37_one_step": {
            **DIFFUSION_MODELS,
            "sites": _unet_sites,
            "guidance_scale": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
            "sample_batch_size": NONNEG_INT,
            "train_per_class": POS_INT,
            "n_templates": POS_INT,
            "eval_per_class": POS_INT,
            "four_step_per_class": POS_INT,
            "k": POS_INT,
            "expansion": POS_INT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "n_features": POS_INT,
            "steer_multiplier": POS_FLOAT,
            "sources_per_target": POS_INT,
            "steer_images": POS_INT,
            "lowpass_cutoff": POS_FLOAT,
            "grid_columns": POS_INT,
        },
        "28_msae": {
            "datasets": IMAGE_DATASETS,
            "n_train": POS_INT,
            "n_test": POS_INT,
            "expansion": POS_INT,
            "msae_ks": (
                lambda v: (
                    isinstance(v, list)
                    and bool(v)
                    and all(_is_int(k) and k > 0 for k in v)
                    and all(a < b for a, b in zip(v, v[1:], strict=False))
                ),
                "a strictly increasing list of positive integers",
            ),
            "msae_alphas": (
                lambda v: (
                    v is None or (isinstance(v, list) and all(_is_number(a) and a >= 0 for a in v))
                ),
                "null (uniform) or a list of numbers >= 0, one per msae_ks",
            ),
            "topk_ks": list_of(POS_INT),
            "relu_l1": list_of(POS_FLOAT),
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "dead_after_tokens": POS_INT,
            "vocab_size": POS_INT,
            "vocab_template": (
                lambda v: isinstance(v, str) and "{}" in v,
                "a string containing {}",
            ),
            "name_threshold": (lambda v: _is_number(v) and -1 <= v < 1, "a cosine in [-1, 1)"),
            "top_m": POS_INT,
            "min_purity": PROBABILITY,
            "n_queries": POS_INT,
            "n_neighbours": POS_INT,
            "steer_strengths": list_of(NONNEG_FLOAT, 2),
            "n_show_latents": POS_INT,
            "n_show_images": POS_INT,
        },
        "34_sauce": {
            "expansion": POS_INT,
            "l1_coefficient": POS_FLOAT,
            "l1_warmup_steps": NONNEG_INT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "delta": POS_FLOAT,
            "negatives": one_of("all", "same_domain"),
            "digit_concepts": (
                lambda v: (
                    isinstance(v, list)
                    and bool(v)
                    and len(set(v)) == len(v)
                    and all(_is_int(d) and 0 <= d <= 9 for d in v)
                ),
                "a non-empty list of distinct digits 0..9",
            ),
            "k_values": list_of(POS_INT),
            "gammas": list_of((_is_number, "a number")),
            "k_main": POS_INT,  # the notebook checks it is in k_values
            "gamma_main": (_is_number, "a number"),  # the notebook checks it is in gammas
            "probe_c": POS_FLOAT,
            "n_grid_features": POS_INT,
            "n_grid_images": POS_INT,
        },
        "03_splice": {
            "datasets": IMAGE_DATASETS,
            "n_eval": POS_INT,
            "corpora": (
                lambda v: (
                    isinstance(v, list)
                    and bool(v)
                    and set(v) <= {"wordnet", "fortunes", "shakespeare", "tweets"}
                ),
                "a non-empty list drawn from ['wordnet', 'fortunes', 'shakespeare', 'tweets']",
            ),
            "docs_per_corpus": POS_INT,
            "n_unigrams": POS_INT,
            "n_bigrams": NONNEG_INT,
            "dedupe_threshold": PROBABILITY,
            "lambdas": list_of(POS_FLOAT, min_len=2),
            "n_iter": POS_INT,
            "l0_target": POS_FLOAT,
            "l0_zero_shot": POS_FLOAT,
            "n_top": POS_INT,
            "n_pairs": POS_INT,
        },
        "21_universal": {
            "datasets": IMAGE_DATASETS,
            "n_train": POS_INT,
            "n_test": POS_INT,
            "image_size": (lambda v: _is_int(v) and v >= 32, "an integer >= 32 (pixels)"),
            "sites": _efficientnet_sites,
            "d_sae": POS_INT,
            "k": POS_INT,  # k <= d_sae is checked by UniversalSAE
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "warmup_steps": NONNEG_INT,
            "ridge_alphas": list_of(POS_FLOAT),
            "min_fires": POS_INT,
            "shared_threshold": FRACTION,
            "n_concepts": POS_INT,
            "n_top_images": POS_INT,
            "extract_batch_size": POS_INT,
        },
        "18_archetypal": {
            "datasets": IMAGE_DATASETS,
            "n_train": POS_INT,
            "n_test": POS_INT,
            "d_sae": POS_INT,
            "k": POS_INT,
            "n_candidates": POS_INT,
            "kmeans_iterations": POS_INT,
            "ra_delta": POS_FLOAT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "nmf_max_iter": POS_INT,
            "n_cone_points": POS_INT,
            "cone_iterations": POS_INT,
            "probe_alpha": POS_FLOAT,
            "n_grid_images": POS_INT,
        },
        "46_monosemanticity": {
            "datasets": IMAGE_DATASETS,
            "n_eval": POS_INT,
            "architecture": one_of("topk", "batchtopk", "matryoshka"),
            "sweep_architecture": one_of("topk", "batchtopk", "matryoshka"),
            "expansion": POS_INT,
            "k": POS_INT,
            "expansions": list_of(POS_INT, 2),
            "ks": list_of(POS_INT, 2),
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "embedder_block": (
                lambda v: _is_int(v) and 0 <= v <= 15,
                "an integer in [0, 15] (an EfficientNet-Lite0 MBConv block)",
            ),
            "embedder_size": POS_INT,
            "pixel_size": POS_INT,
            "min_fires": POS_INT,
            "n_grid_latents": POS_INT,
            "n_grid_images": POS_INT,
        },
        "17_saeuron": {
            **DIFFUSION_MODELS,
            "site": _unet_site,
            "site_value": one_of("update", "output"),
            "num_steps": POS_INT,
            "eta": FRACTION,
            "guidance_scale": (lambda v: _is_number(v) and v >= 1, "a number >= 1"),
            "per_template": POS_INT,
            "activation_seed": NONNEG_INT,
            "d_sae": POS_INT,
            "k": POS_INT,
            "aux_coefficient": NONNEG_FLOAT,
            "dead_after_tokens": POS_INT,
            "sae_steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "score_delta": NONNEG_FLOAT,
            "tau": POS_INT,
            "gamma": (lambda v: _is_number(v) and v < 0, "a negative number"),
            "n_eval": POS_INT,
            "eval_seed": NONNEG_INT,
            "floor_seed": NONNEG_INT,
            "insert_targets": list_of(STRING, min_len=0),
            "multi_targets": list_of(STRING),
            "similar_groups": list_of(STRING),
            "show_target": STRING,
            "grid_images": POS_INT,
        },
        "19_saebench": {
            "architectures": ARCHITECTURE_LIST,
            "d_sae": POS_INT,
            "k": POS_INT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "train_tokens": POS_INT,
            "eval_tokens": POS_INT,
            "probe_docs": POS_INT,
            "probe_max_len": AT_LEAST_2,
            "probe_tasks": POS_INT,
            "probe_ks": INT_LIST_STRING,
            "probe_min_class": POS_INT,
            "absorption_words": POS_INT,
            "loss_windows": POS_INT,
            "loss_context": AT_LEAST_2,
        },
        "22_matryoshka": {
            "toy_samples": POS_INT,
            "toy_parents": POS_INT,
            "toy_children_per_parent": POS_INT,
            "toy_d": POS_INT,
            "toy_k": POS_INT,
            "toy_steps": POS_INT,
            "toy_batch_size": POS_INT,
            "toy_lr": POS_FLOAT,
            "train_tokens": POS_INT,
            "eval_tokens": POS_INT,
            "d_sae": POS_INT,
            "k": POS_INT,
            "prefix_fractions": PREFIX_FRACTIONS,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "lr_warmup_steps": NONNEG_INT,
            "absorption_words": AT_LEAST_50,
        },
        "45_absorption": {
            "architecture": one_of("topk", "batchtopk"),
            "train_tokens": POS_INT,
            "eval_tokens": POS_INT,
            "widths": list_of(POS_INT, min_len=2),
            "width_sweep_k": POS_INT,
            "ks": list_of(POS_INT, min_len=2),
            "k_sweep_width": POS_INT,
            "steps": POS_INT,
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "lr_warmup_steps": NONNEG_INT,
            "absorption_words": AT_LEAST_50,
        },
    },
}


def _validate(value: Any, schema: Any, key: str) -> None:
    """``schema`` is a mapping, a leaf ``(check, expected)`` or a function ``(value, key)``."""
    if callable(schema):
        schema(value, key)
    elif isinstance(schema, dict):
        if not isinstance(value, dict):
            raise ParamsError(
                f"params.yaml: `{key or '<top level>'}` must be a mapping, got {value!r}"
            )
        unknown = sorted(set(value) - set(schema))
        if unknown:
            raise ParamsError(
                f"params.yaml: unknown key(s) {[f'{key}.{u}'.lstrip('.') for u in unknown]}; "
                f"valid keys{' under `' + key + '`' if key else ''}: {sorted(schema)}"
            )
        missing = sorted(set(schema) - set(value))
        if missing:
            raise ParamsError(
                f"params.yaml: missing key(s) {[f'{key}.{m}'.lstrip('.') for m in missing]}; "
                "see profiles/README.md or restore it with `python -m common.params use default`"
            )
        for name, sub in schema.items():
            _validate(value[name], sub, f"{key}.{name}".lstrip("."))
    else:
        check, expected = schema
        if not check(value):
            raise _fail(key, value, expected, _hint(value, expected))


def _lm_layers(params: dict[str, Any]) -> None:
    """``lm.site`` and ``lm.mlp_site`` name layers that ``lm.model`` has (when known unloaded)."""
    from common.models.sites import site_name_error

    model = params["lm"]["model"]
    n = _n_layers(model)
    if n is None:
        return
    for name in ("site", "mlp_site"):
        why = site_name_error(params["lm"][name], n_layers=n)
        if why is not None:
            expected = f"a hook site of {model} ({n} layers: '<kind>.0' .. '<kind>.{n - 1}')"
            raise _fail(f"lm.{name}", params["lm"][name], expected, f": {why}")


# Checks that read more than one key, run once every key has passed its own check.
CROSS_CHECKS: tuple[Callable[[dict[str, Any]], None], ...] = (_lm_layers,)


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ParamsError`` naming the first bad key; return ``params`` unchanged otherwise.

    Checks the file only (no hardware): see ``check_hardware`` for the devices.
    """
    _validate(params, SCHEMA, "")
    for cross_check in CROSS_CHECKS:
        cross_check(params)
    return params


def _device_keys(schema: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """The dotted keys of every device in ``schema``."""
    for name, sub in schema.items():
        key = f"{prefix}.{name}".lstrip(".")
        if isinstance(sub, dict):
            yield from _device_keys(sub, key)
        elif sub is DEVICE:
            yield key


def check_hardware(params: dict[str, Any]) -> None:
    """Every device named in (valid) ``params`` exists on this machine, or a ``ParamsError``."""
    from common.device import resolve_device

    for key in _device_keys(SCHEMA):
        value: Any = params
        for part in key.split("."):
            value = value[part]
        try:
            resolve_device(value, key=key)
        except ValueError as err:
            raise ParamsError(
                f"params.yaml: {err}. To validate the file for another machine: "
                "`python -m common.params check --no-hardware`"
            ) from err


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read ``path`` with ``load_yaml`` and validate it (``validate_params``)."""
    path = Path(path)
    try:
        params = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {err}") from err
    return validate_params(params)


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` wins; nested mappings merge key by key; a ``null`` in the overlay deletes."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def profile_params(name: str) -> dict[str, Any]:
    """``profiles/default.yaml`` with ``profiles/<name>.yaml`` merged on top."""
    default = load_yaml((PROFILES / "default.yaml").read_text())
    if name == "default":
        return default
    overlay_path = PROFILES / f"{name}.yaml"
    if not overlay_path.exists():
        valid = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ParamsError(f"unknown profile {name!r}; valid profiles: {valid}")
    return deep_merge(default, load_yaml(overlay_path.read_text()) or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate params.yaml and its devices on this machine")
    check.add_argument("--params", default="params.yaml")
    check.add_argument("--out", help="write a small JSON stamp here when valid")
    check.add_argument(
        "--no-hardware",
        action="store_true",
        help="do not check that the devices exist here (validating for another machine)",
    )
    use = sub.add_parser("use", help="write params.yaml from a profile")
    use.add_argument("profile")
    use.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            params = load_params(args.params)
            if not args.no_hardware:
                check_hardware(params)
            if args.out:
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                # Independent of the values: downstream stages rerun only on their own params.
                Path(args.out).write_text(json.dumps({"params_valid": True}) + "\n")
            print(f"{args.params}: valid")
        else:
            params = validate_params(profile_params(args.profile))
            header = (
                f"# Generated by `python -m common.params use {args.profile}` from profiles/.\n"
                "# Edit freely (or `dvc exp run -S key=value`);\n"
                "# restore with `python -m common.params use default`.\n"
            )
            Path(args.params).write_text(header + yaml.safe_dump(params, sort_keys=False))
            print(f"{args.params} <- profile {args.profile!r}")
    except ParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
