"""The shared sections of params.yaml, declared once with their types and defaults.

Each paper's own section is declared in its folder (``papers/<folder>/params.py``); what several
papers share lives here: the seed, the toy data, the language model and its activations, the
cross-architecture comparison (``toy_train``, ``lm_train``), the CLIP-style and diffusion models,
and ``papers`` (the evaluation seeds, the vision papers' CLIP, and the training settings every
paper's SAEs share: ``papers.training``). The defaults are the default profile; profiles override
values (``profiles/*.yaml``). Value types that papers reuse (hook sites, model names) are here too.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from common import layout
from common.params import (
    CommaInts,
    Device,
    Fraction,
    Increasing,
    Invalid,
    NonNegInt,
    PositiveFloat,
    PositiveInt,
    Probability,
    Section,
    Seeds,
    Text,
    expects,
    fail,
    hint,
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


def hf_cached_config(repo_id: str) -> Path | None:
    """``config.json`` of ``repo_id`` in the local Hugging Face cache, if it is there."""
    hub = os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snapshots = Path(hub) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return next(iter(sorted(snapshots.glob("*/config.json"))), None)


def _model_error(
    value: str,
    builtins: tuple[str, ...],
    outputs: tuple[str, ...],
    roots: tuple[str, ...],
    needs_config: bool,
) -> str | None:
    """Why ``value`` names no model (see ``model_name``), or None; nothing is loaded."""
    if not value.strip():
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
    if HUB_ID.fullmatch(value) or value in roots or (roots and hf_cached_config(value)):
        return None
    builtin = "not a built-in model, " if builtins else ""
    return f": {builtin}no such folder, and not a hub id 'owner/name'{did_you_mean}"


def model_name(
    what: str,
    *,
    builtins: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    roots: tuple[str, ...] = (),
    needs_config: bool = False,
    example: str,
) -> Any:
    """A string type naming a model: one of ``builtins``, a pipeline output (``outputs``, which may
    not exist yet), a local folder that exists, or a hub id shaped ``owner/name`` such as
    ``example`` (or a namespace-less hub model in ``roots`` or in the local cache), which must be in
    the local Hugging Face cache when the work runs (the pipeline never downloads)."""
    forms = [f"one of {list(outputs)} (a pipeline output)"] if outputs else []
    forms += [f"a built-in model {list(builtins)}"] if builtins else []
    forms += [
        "a local folder" + (" with config.json" if needs_config else ""),
        f"a hub id 'owner/name' (e.g. {example!r}"
        + (f", or {roots[0]!r} without an owner)" if roots else ")"),
    ]
    expected = f"{what}: " + ", ".join(forms)

    def check(value: str) -> str:
        why = _model_error(value, builtins, outputs, roots, needs_config)
        if why is not None:
            raise Invalid(expected, why)
        return value

    return Annotated[str, AfterValidator(check), expects(expected)]


def _text_models() -> tuple[str, ...]:
    from common.models.loading import BUILTIN_MODELS

    return tuple(n for n in BUILTIN_MODELS if BUILTIN_LAYERS.get(n, ("transformer",))[0] != "cnn")


def _lm_model(value: str) -> str:
    """``lm.model``: a text model (the built-ins with transformer sites), a folder or a hub id."""
    from common.models.loading import BUILTIN_MODELS

    text = _text_models()
    if value in BUILTIN_MODELS and value not in text:
        raise Invalid(f"a text model such as {list(text)}", ": it is a vision model")
    expected = "a text model: " + ", ".join(
        [
            f"a built-in model {list(text)}",
            "a local folder with config.json",
            f"a hub id 'owner/name' (e.g. 'EleutherAI/pythia-70m', or {ROOT_HUB_MODELS[0]!r} "
            "without an owner)",
        ]
    )
    why = _model_error(value, text, (), ROOT_HUB_MODELS, True)
    if why is not None:
        raise Invalid(expected, why)
    return value


LMModel = Annotated[str, AfterValidator(_lm_model)]


def n_layers_of(spec: str) -> int | None:
    """The number of blocks of model ``spec`` when known without loading it: a built-in, or the
    config.json of a local folder or of a hub model in the local cache; else None."""
    if spec in BUILTIN_LAYERS:
        return BUILTIN_LAYERS[spec][1]
    config: Path | None = Path(spec).expanduser() / "config.json"
    if config is None or not config.is_file():
        config = hf_cached_config(spec)
    if config is None:
        return None
    data = json.loads(config.read_text())
    for source in (data, data.get("text_config") or {}):
        for name in ("num_hidden_layers", "n_layer", "num_layers"):
            value = source.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


# --- hook sites: the vocabulary of common.hooks --------------------------------------------------
TRANSFORMER_SITES = (
    "a hook site '<kind>.<layer>' with kind one of resid_post, mlp_out, attn_z, mlp_hidden "
    "(e.g. 'resid_post.6', 'mlp_out.6', 'attn_z.3', 'mlp_hidden.3'; common.hooks)"
)
UNET_SITE = re.compile(r"unet\.(?:(?:down|up)_blocks\.[0-9]+|mid_block)\.attentions\.[0-9]+")
UNET_SITES = (
    "a U-Net cross-attention block 'unet.down_blocks.I.attentions.J', "
    "'unet.mid_block.attentions.J' or 'unet.up_blocks.I.attentions.J' "
    "(e.g. 'unet.up_blocks.0.attentions.1'; common.hooks)"
)


def _transformer_site(value: str) -> str:
    """A transformer site by name; its layer is checked against ``lm.model`` in ``cross_checks``."""
    from common.hooks import site_name_error

    why = site_name_error(value)
    if why is not None:
        raise Invalid(TRANSFORMER_SITES, f": {why}")
    return value


HookSite = Annotated[str, AfterValidator(_transformer_site), expects(TRANSFORMER_SITES)]


def _efficientnet_sites(value: list[str]) -> list[str]:
    """At least two distinct EfficientNet-Lite0 sites (paper 21 compares them as "models")."""
    from common.hooks import site_name_error

    n = BUILTIN_LAYERS["efficientnet-lite0"][1]
    expected = (
        f"a list of >= 2 distinct EfficientNet-Lite0 sites, 'block.L' (L = 0..{n - 1}) or "
        "'features' (e.g. [block.10, features])"
    )
    if len(value) < 2 or len(set(value)) != len(value):
        raise Invalid(expected)
    for site in value:
        why = site_name_error(site, cnn=True, n_layers=n)
        if why is not None:
            raise Invalid(expected, f": {why}")
    return value


EfficientNetSites = Annotated[
    list[str],
    AfterValidator(_efficientnet_sites),
    expects("a list of >= 2 distinct EfficientNet-Lite0 sites, 'block.L' or 'features'"),
]


def _unet_site_error(site: str) -> str | None:
    """Why ``site`` is not a U-Net site name (the U-Net itself checks that the block exists)."""
    if UNET_SITE.fullmatch(site):
        return None
    prefixed = UNET_SITE.fullmatch(f"unet.{site}") is not None
    return f": {site!r} is not one" + (f" (did you mean 'unet.{site}'?)" if prefixed else "")


def _unet_site(value: str) -> str:
    why = _unet_site_error(value)
    if why is not None:
        raise Invalid(UNET_SITES, why)
    return value


def _unet_sites(value: str | list[str]) -> str | list[str]:
    expected = f"'auto' or a non-empty list, each {UNET_SITES}"
    if value == "auto":
        return value
    if not isinstance(value, list) or not value:
        raise Invalid(expected)
    for site in value:
        why = _unet_site_error(site)
        if why is not None:
            raise Invalid(expected, why)
    return value


UNetSite = Annotated[str, AfterValidator(_unet_site), expects(UNET_SITES)]
UNetSites = Annotated[
    str | list[str], AfterValidator(_unet_sites), expects(f"'auto' or a list of {UNET_SITES}")
]

# The vision papers' CLIP, the diffusion papers' model and scorer: the pipeline's own by default,
# a hub model by name in the GPU profile.
ClipModel = model_name(
    "a CLIP", outputs=(layout.CLIP_STYLE,), example="openai/clip-vit-base-patch16"
)
DiffusionModelName = model_name(
    "a diffusion model", outputs=(layout.DIFFUSION,), example="stabilityai/sdxl-turbo"
)
ScorerName = model_name(
    "an image scorer (a classifier or a CLIP)",
    outputs=(layout.CLASSIFIER, layout.CLIP_STYLE),
    example="openai/clip-vit-base-patch16",
)


# --- SAE hyperparameters by run name, checked against the architecture registry ------------------
def _sae_runs(value: dict[str, Any]) -> dict[str, Any]:
    """``{run_name: {architecture: ..., hyperparameter: value}}``, checked against the registry.

    ``architecture`` defaults to the run name, so ``relu: {l1_coefficient: 1e-3}`` is a ReLU SAE
    and ``topk_no_aux: {architecture: topk, aux_coefficient: 0}`` a TopK SAE without AuxK.
    """
    from common.sae import available_architectures, get_architecture

    expected = "a mapping of run names to SAE hyperparameters"
    if not value:
        raise Invalid(expected)
    for run, hyper in value.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(run)):
            # DVC reads a dot in a params key as nesting: `sweep_lm@relu_1.5` would find no params
            raise Invalid(
                "a run name of letters, digits, `_` and `-`",
                f" (write 1.5 as 1p5): {run!r}",
                subkey=str(run),
                value=run,
            )
        if not isinstance(hyper, dict):
            raise Invalid("a mapping of hyperparameters", subkey=run, value=hyper)
        arch = hyper.get("architecture", run)
        if arch not in available_architectures():
            raise Invalid(
                "an architecture of the registry",
                f": unknown architecture {arch!r}; valid: {available_architectures()} (add "
                "`architecture: <name>` to a custom run name)",
                subkey=run,
                value=arch,
            )
        config_class = get_architecture(arch).config_class
        fields = {f.name for f in dataclasses.fields(config_class)} - {"d_in"}
        unknown = sorted(set(hyper) - fields - {"architecture"})
        if unknown:
            raise Invalid(
                f"hyperparameters of {arch!r}: {sorted(fields)}",
                f": unknown hyperparameter(s) {unknown}",
                subkey=run,
                value=hyper,
            )
        for name, v in hyper.items():
            items = v if isinstance(v, list) else [v]
            bad = any(
                (isinstance(x, float) and not math.isfinite(x))
                or (isinstance(x, str) and _as_number_text(x))
                for x in items
            )
            if bad:
                raise Invalid(
                    "a finite number", hint(v, "a number"), subkey=f"{run}.{name}", value=v
                )
        try:
            config_class(d_in=1, **{k: v for k, v in hyper.items() if k != "architecture"})
        except (TypeError, ValueError) as err:
            raise Invalid(f"valid hyperparameters of {arch!r}", f": {err}", subkey=run) from err
    return value


def _as_number_text(text: str) -> bool:
    try:
        return math.isfinite(float(text.strip().replace("_", "")))
    except ValueError:
        return False


SAERuns = Annotated[dict[str, Any], AfterValidator(_sae_runs)]


# --- the shared sections -------------------------------------------------------------------------
class Toy(Section):
    """Ground-truth toy activations: known unit-norm features, sparse nonnegative codes (true L0 =
    n_features * p_active)."""

    generator: Literal["superposition", "hierarchical", "correlated", "known_magnitudes"] = (
        "superposition"
    )
    n_samples: PositiveInt = 60000
    n_features: PositiveInt = 256
    d: PositiveInt = 64
    p_active: Probability = 0.02


class SweepTraining(Section):
    """Every architecture trained on the same activations with the same budget (00_compare)."""

    steps: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    lr_warmup_steps: NonNegInt
    lr_decay_fraction: Fraction = 0.2
    dead_after_tokens: PositiveInt
    normalize_activations: bool
    device: Device = "cpu"
    saes: SAERuns


def _toy_saes() -> dict[str, Any]:
    return {
        "relu": {"d_sae": 512, "l1_coefficient": 0.5, "l1_warmup_steps": 200},
        "gated": {"d_sae": 512, "l1_coefficient": 1.0, "l1_warmup_steps": 200},
        "jumprelu": {
            "d_sae": 512,
            "l0_coefficient": 0.1,
            "bandwidth": 0.05,
            "initial_threshold": 0.1,
        },
        "topk": {"d_sae": 512, "k": 8},
        "batchtopk": {"d_sae": 512, "k": 8},
        "matryoshka": {"d_sae": 512, "k": 8},
        "msae": {"d_sae": 512, "ks": [2, 4, 8, 16]},
        "switch": {"d_sae": 512, "n_experts": 4, "k": 8},
        "archetypal": {"d_sae": 512, "k": 8, "n_candidates": 512},
        "ra": {"d_sae": 512, "k": 8, "n_candidates": 512, "delta": 0.3},
        "mp": {"d_sae": 512, "k": 8},
    }


class ToyTrain(SweepTraining):
    steps: PositiveInt = 1200
    batch_size: PositiveInt = 1024
    lr: PositiveFloat = 0.001
    lr_warmup_steps: NonNegInt = 100
    dead_after_tokens: PositiveInt = 200000
    normalize_activations: bool = False
    saes: SAERuns = Field(default_factory=_toy_saes)


class LM(Section):
    """Real language-model activations: SmolLM2-135M-Instruct (Q4_1-dequantized) by default."""

    model: LMModel = "smollm2-135m"
    site: HookSite = "resid_post.12"
    mlp_site: HookSite = "mlp_out.12"
    """extracted beside `site` from the same forward (paper 01)"""
    corpus: Literal["wordnet", "fortunes", "shakespeare", "tweets"] = "wordnet"
    context_len: PositiveInt = 128
    train_tokens: PositiveInt = 200000
    eval_tokens: PositiveInt = 20000
    downstream_windows: PositiveInt = 8
    """test windows for CE / KL loss recovered with the SAE spliced in"""
    batch_size: PositiveInt = 16
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: Device = "cpu"


def _compared_runs() -> list[str]:
    return [
        "relu_l1_3",
        "gated_l1_6",
        "jumprelu",
        "topk_k32",
        "batchtopk_k32",
        "matryoshka_k32",
        "msae",
        "switch_k32",
        "archetypal_k32",
        "ra_k32",
        "mp_k32",
    ]


class Compare(Section):
    """The cross-architecture comparison (papers/00_compare): every architecture on the toy data
    (``toy_train``) and, on the LM, one run per architecture of the shared sweep (seed 0)."""

    title: Text = "Every architecture on the same activations"
    lm_runs: Annotated[list[Text], Field(min_length=1)] = Field(default_factory=_compared_runs)
    """runs of `lm_sweep.saes` evaluated downstream and compared (papers/00_compare)"""


class ClipStyle(Section):
    """The CLIP-style dual encoder of the vision papers (common/models/clip_style): frozen
    EfficientNet-Lite0 (7x7 = 49 patch tokens at 224 px) + frozen all-MiniLM-L6-v2, trained
    projection heads."""

    n_train: PositiveInt = 2000
    """training images per dataset (Fashion-MNIST, digits)"""
    n_test: PositiveInt = 1000
    image_size: Annotated[int, Field(ge=32)] = 224
    epochs: PositiveInt = 30
    d_embed: PositiveInt = 256


class Diffusion(Section):
    """The text-to-image diffusion model of the diffusion papers: a 1.3M-parameter diffusers U-Net
    with cross-attention over MiniLM caption tokens, 16x16 Fashion-MNIST."""

    steps: PositiveInt = 1200
    """AdamW steps of `batch_size` images"""
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.002
    p_uncond: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """caption dropout for classifier-free guidance"""
    sample_per_class: PositiveInt = 16
    sample_steps: CommaInts = "1,4,10"
    """DDIM step counts of the scored sample grids"""


class Classifier(Section):
    """The 16x16 CNN that scores the diffusion model's samples."""

    epochs: PositiveFloat = 3
    n_train: PositiveInt = 60000


class Training(Section):
    """How every paper's SAEs are trained, unless a paper says otherwise (``common.kit.train``):
    Adam with a linear warm-up over the first ``lr_warmup_fraction`` of the steps, a linear decay
    to 0 over the last ``lr_decay_fraction``, gradient-norm clipping at ``grad_clip``, activations
    normalised to E||x|| = sqrt(d) (``normalize_activations``)."""

    lr_warmup_fraction: Fraction = 0.1
    lr_decay_fraction: Fraction = 0.2
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    normalize_activations: bool = True
    dead_window_fraction: Probability = 0.25
    """a latent silent for this share of the run's tokens is dead (AuxK revives it): the window
    follows the run, as peers count it in steps, instead of a fixed token count"""


def _sweep_saes() -> dict[str, Any]:
    """The LM sweep: every architecture at 1152 latents (2x d_model) and L0 about 32, the ReLU
    and gated penalty sweeps, the TopK k sweep and width sweep (papers 00, 02, 07, 19, 22, 45)."""
    w = 1152
    runs: dict[str, Any] = {}
    for arch, l1s in (("relu", (1.5, 3.0, 6.0)), ("gated", (3.0, 6.0, 12.0))):
        for l1 in l1s:  # run names carry no dot (DVC would read it as nesting): 1.5 -> 1p5
            name = f"{arch}_l1_{l1:g}".replace(".", "p")
            runs[name] = {"architecture": arch, "d_sae": w, "l1_coefficient": l1}
    runs["jumprelu"] = {
        "d_sae": w,
        "l0_coefficient": 1.0,
        "bandwidth": 0.5,
        "initial_threshold": 1.5,
    }
    for k in (8, 16, 24, 32, 64):
        runs[f"topk_k{k}"] = {"architecture": "topk", "d_sae": w, "k": k}
    for width in (576, 2304):
        for k in (8, 32):
            runs[f"topk_k{k}_w{width}"] = {"architecture": "topk", "d_sae": width, "k": k}
    runs["topk_k8_w2304_plain"] = {
        "architecture": "topk",
        "d_sae": 2304,
        "k": 8,
        "aux_coefficient": 0.0,
        "tied_init": False,
    }
    for arch in ("batchtopk", "matryoshka", "switch", "mp"):
        runs[f"{arch}_k32"] = {"architecture": arch, "d_sae": w, "k": 32}
    runs["switch_k32"]["n_experts"] = 4
    # MSAE at its largest k at inference: the ReLU-only inference of paper 28 over-reconstructs
    # SmolLM2 activations (gamma about 2, FVU above 1 at L0 ~400; see papers/00_compare)
    runs["msae"] = {"d_sae": w, "ks": [4, 8, 16, 32], "inference_topk": True}
    runs["archetypal_k32"] = {
        "architecture": "archetypal",
        "d_sae": w,
        "k": 32,
        "n_candidates": 2048,
    }
    runs["ra_k32"] = {
        "architecture": "ra",
        "d_sae": w,
        "k": 32,
        "n_candidates": 2048,
        "delta": 1.0,
    }
    return runs


class LMSweep(Section):
    """One sweep of SAEs on the LM's training activations (``lm.site``), trained once by the
    ``sweep_lm`` stage for every seed of ``papers.seeds`` with the shared training settings
    (``papers.training``) and a half-budget snapshot; the LM papers (00, 02, 07, 19, 22, 45) read
    their SAEs from it (``paper.sweep_sae``) instead of training their own."""

    steps: PositiveInt = 600
    batch_size: PositiveInt = 512
    lr: PositiveFloat = 0.001
    device: Device = "cpu"
    saes: SAERuns = Field(default_factory=_sweep_saes)
    """run name -> architecture and hyperparameters"""


# The shared inputs of each kind, for dvc.yaml's `paper` pattern: the folder a paper stage depends
# on, and the params section that describes those inputs.
INPUT_STAGE: dict[str, dict[str, str]] = {
    "toy": {"data": "data/toy", "params": "toy"},
    "lm": {"data": "data/lm", "params": "lm"},
    "vision": {"data": "data/vision", "params": "clip_style"},
    "diffusion": {"data": "data/diffusion", "params": "diffusion"},
}


class Papers(Section):
    """What every paper folder shares. Each folder's own section (``papers.<name>``, the folder
    name without its number) is declared in ``papers/<folder>/params.py``;
    ``inputs`` (generated from those declarations) says which shared inputs each
    folder reads, for ``dvc.yaml``'s ``paper`` pattern."""

    seeds: Seeds = [0, 1, 2]
    """claims are checked over each of these seeds"""
    clip: ClipModel = layout.CLIP_STYLE
    """the vision papers' CLIP: the CLIP-style model, or a hub CLIP by name"""
    training: Training = Field(default_factory=Training)
    inputs: dict[str, dict[str, str]] = Field(default_factory=dict)
    """generated: per folder, the shared inputs it reads (`data`) and their params (`params`)"""


class SharedParams(Section):
    """The whole of params.yaml except the paper folders' own sections."""

    seed: NonNegInt = 0
    toy: Toy = Field(default_factory=Toy)
    toy_train: ToyTrain = Field(default_factory=ToyTrain)
    lm: LM = Field(default_factory=LM)
    lm_sweep: LMSweep = Field(default_factory=LMSweep)
    compare: Compare = Field(default_factory=Compare)
    clip_style: ClipStyle = Field(default_factory=ClipStyle)
    diffusion: Diffusion = Field(default_factory=Diffusion)
    classifier: Classifier = Field(default_factory=Classifier)
    papers: Papers = Field(default_factory=Papers)


# --- checks that read more than one key ----------------------------------------------------------
def _lm_layers(params: dict[str, Any]) -> None:
    """``lm.site`` and ``lm.mlp_site`` name layers that ``lm.model`` has (when known unloaded)."""
    from common.hooks import site_name_error

    model = params["lm"]["model"]
    n = n_layers_of(model)
    if n is None:
        return
    for name in ("site", "mlp_site"):
        why = site_name_error(params["lm"][name], n_layers=n)
        if why is not None:
            expected = f"a hook site of {model} ({n} layers: '<kind>.0' .. '<kind>.{n - 1}')"
            raise fail(f"lm.{name}", params["lm"][name], expected, f": {why}")


def _compared_runs_exist(params: dict[str, Any]) -> None:
    runs = params["lm_sweep"]["saes"]
    missing = [r for r in params["compare"]["lm_runs"] if r not in runs]
    if missing:
        raise fail(
            "compare.lm_runs",
            params["compare"]["lm_runs"],
            f"runs of lm_sweep.saes {sorted(runs)}",
            f": {missing} are not in the sweep",
        )


def _paper_sweep_runs_exist(params: dict[str, Any]) -> None:
    """The sweep runs each paper folder declares it reads (``SweepRun(s)`` fields) are in
    ``lm_sweep.saes``."""
    from common.kit.params import check_sweep_runs
    from common.params import paper_params_class, paper_sections

    for key, folder in paper_sections().items():
        section = paper_params_class(folder).model_validate(params["papers"][key])
        check_sweep_runs(folder, section, params["lm_sweep"]["saes"])


def cross_checks(params: dict[str, Any]) -> None:
    """Checks that read more than one key, run once every key has passed its own check."""
    _lm_layers(params)
    _compared_runs_exist(params)
    _paper_sweep_runs_exist(params)


__all__ = [
    "BUILTIN_LAYERS",
    "ClipModel",
    "DiffusionModelName",
    "EfficientNetSites",
    "HookSite",
    "Increasing",
    "ScorerName",
    "SharedParams",
    "Training",
    "UNetSite",
    "UNetSites",
]
