"""Validation of ``params.yaml`` before any work, and switching between profiles.

Every key of ``params.yaml`` is declared in ``SCHEMA`` with the kind of value it takes. A typo, a
wrong type or a negative budget fails at once with the dotted key, the value found and the value
expected; ``check_params`` is the first stage of the pipeline.

    python -m common.params check         # validate params.yaml
    python -m common.params use smoke     # params.yaml <- profiles/default.yaml + smoke.yaml
    python -m common.params use default   # back to the embedded default profile
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

Check = Callable[[Any], bool]
ROOT = Path(__file__).resolve().parent.parent
PROFILES = ROOT / "profiles"


class ParamsError(ValueError):
    """A value in params.yaml is malformed; the message names the key and what is expected."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


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

SAE_HYPERPARAMETERS = "sae-hyperparameters"
PAPER_FOLDERS = "paper-folders"


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
    "diffusion": STRING,
    "scorer": STRING,
    "class_names": list_of(STRING, min_len=0),
    "device": STRING,
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
    "device": STRING,
    "saes": SAE_HYPERPARAMETERS,
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
        "model": STRING,
        "site": STRING,
        "mlp_site": STRING,
        "corpus": one_of("wordnet", "fortunes", "shakespeare", "tweets"),
        "context_len": POS_INT,
        "train_tokens": POS_INT,
        "eval_tokens": POS_INT,
        "downstream_windows": POS_INT,
        "batch_size": POS_INT,
        "dtype": one_of("float32", "float16", "bfloat16"),
        "device": STRING,
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
        "folders": "paper-folders",
        "clip": STRING,
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
            "sites": (
                lambda v: (
                    v == "auto"
                    or (
                        isinstance(v, list)
                        and bool(v)
                        and all(isinstance(s, str) and s.startswith("unet.") for s in v)
                    )
                ),
                "'auto' or a non-empty list of U-Net sites (unet.<module path>)",
            ),
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
            "sites": (
                lambda v: (
                    isinstance(v, list)
                    and len(v) >= 2
                    and len(set(v)) == len(v)
                    and all(
                        isinstance(s, str)
                        and (s == "features" or (s.startswith("block.") and s[6:].isdigit()))
                        for s in v
                    )
                ),
                "a list of >= 2 distinct EfficientNet sites ('block.L' or 'features')",
            ),
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
            "site": STRING,
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
    if schema == SAE_HYPERPARAMETERS:
        _sae_hyperparameters(value, key)
    elif schema == PAPER_FOLDERS:
        _paper_folders(value, key)
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
            raise ParamsError(f"params.yaml: `{key}` must be {expected}, got {value!r}")


def validate_params(params: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ParamsError`` naming the first bad key; return ``params`` unchanged otherwise."""
    _validate(params, SCHEMA, "")
    return params


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
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
    default = yaml.safe_load((PROFILES / "default.yaml").read_text())
    if name == "default":
        return default
    overlay_path = PROFILES / f"{name}.yaml"
    if not overlay_path.exists():
        valid = sorted(p.stem for p in PROFILES.glob("*.yaml"))
        raise ParamsError(f"unknown profile {name!r}; valid profiles: {valid}")
    return deep_merge(default, yaml.safe_load(overlay_path.read_text()) or {})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate params.yaml")
    check.add_argument("--params", default="params.yaml")
    check.add_argument("--out", help="write a small JSON stamp here when valid")
    use = sub.add_parser("use", help="write params.yaml from a profile")
    use.add_argument("profile")
    use.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            load_params(args.params)
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
