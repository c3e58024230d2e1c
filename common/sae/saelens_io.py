"""Read and write the SAELens on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

SAELens (6.x) folders are what most released SAEs use; ``SAE.load_from_disk(path)`` in SAELens
reads them. Our own format is ``config.json`` + ``sae.safetensors`` (``common.sae.base``). The
weights have the same names and shapes in both (W_enc ``(d_in, d_sae)``, W_dec ``(d_sae, d_in)``),
so conversion is a copy plus the mappings below, each chosen so that SAELens's ``encode`` and ours
give the same codes z for the same x:

    ours (registry)   SAELens        encoder, with x' = x - b_dec (apply_b_dec_to_input=True)
    relu        <->   "standard"     z = ReLU(W_enc^T x' + b_enc)                          (paper 1)
    gated       <->   "gated"        z = 1[W_enc^T x' + b_gate > 0]
                                         * ReLU((exp(r_mag) * W_enc)^T x' + b_mag)         (paper 2)
    topk        <->   "topk"         z = TopK_k(ReLU(W_enc^T x' + b_enc))                  (paper 7)
    jumprelu    <->   "jumprelu"     z = pre * 1[pre > theta],  pre = W_enc^T x' + b_enc  (paper 19)
    batchtopk    ->   "jumprelu"     the inference rule z = pre * 1[pre > theta] with one scalar
                                     theta (paper 22), written as a per-latent threshold;
                                     SAELens itself saves BatchTopK SAEs this way.
    decoder (all):                   x_hat = W_dec^T z + b_dec

Details of the mapping:

* Tied ReLU SAEs are written untied (W_dec = W_enc^T); they come back as untied ``relu`` SAEs.
* JumpReLU: we train ``log_threshold``; SAELens stores ``threshold = exp(log_threshold)``. SAELens
  encodes ``ReLU(pre) * 1[pre > threshold]``, which equals ``pre * 1[pre > max(threshold, 0)]``;
  on import ``log_threshold = log(max(threshold, 0))``, i.e. ``-inf`` (a plain ReLU) where the
  stored threshold is <= 0. Old SAELens folders holding ``log_threshold`` are read as well.
* TopK: SAELens takes the top k of ``pre`` then a ReLU; we take the top k of ``ReLU(pre)``. Both
  keep the same positive values at the same places. SAELens's ``rescale_acts_by_decoder_norm``
  (select on ``pre * ||W_dec[i]||``, decode ``z / ||W_dec[i]||``) is folded on import:
  ``W_enc[:, i] *= n_i, b_enc[i] *= n_i, W_dec[i] /= n_i`` gives identical codes and outputs.
* ``apply_b_dec_to_input=False`` (SAELens encodes x, not x - b_dec) is folded on import into the
  encoder biases: ``b_enc += W_enc^T b_dec`` (gated: ``b_gate += W_enc^T b_dec``,
  ``b_mag += (exp(r_mag) * W_enc)^T b_dec``).
* ``normalize_activations``: "none" is read as is; "expected_average_only_in" is read with a
  warning, because SAELens's ``encode`` of a folder loaded from disk does not rescale inputs either
  (the scaling factor is not stored in the folder); input-dependent normalisations ("layer_norm",
  "constant_norm_rescale", "covariance_whitening") are rejected.
* ``reshape_activations="hook_z"`` SAEs are read; our ``encode`` then takes the flattened
  ``(..., n_heads * d_head)`` input that SAELens builds internally.
* Training-only options (decoder norm constraints, L1 warm-up, AuxK) do not change encodings. Our
  config is stored in ``metadata["sae_replications_config"]`` on export and reused on import when
  it describes the same architecture; otherwise defaults are used, with ``unit_norm_decoder`` set
  to whether the decoder rows have unit norm.

Weights are read with safetensors only: pickled checkpoints (``.pt``, ``.pth``) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from common.sae.base import CONFIG_FILE, SAE, WEIGHTS_FILE
from common.sae.registry import build_sae, get_architecture

SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
# The SAELens release this writer was checked against (its own loader reads what we write). Any
# version >= 6.0 tells SAELens's loader that the folder needs no pre-6.0 config conversion.
SAELENS_FORMAT_VERSION = "6.54.12"
OUR_CONFIG_KEY = "sae_replications_config"
_RESERVED_METADATA = ("sae_lens_version", "sae_lens_training_version", OUR_CONFIG_KEY)
_UNIT_NORM_ATOL = 1e-4

# Our architecture -> the SAELens architecture it is exported as.
EXPORTS: dict[str, str] = {
    "relu": "standard",
    "gated": "gated",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
}
# SAELens architecture -> our architecture it is imported as.
IMPORTS: dict[str, str] = {
    "standard": "relu",
    "gated": "gated",
    "topk": "topk",
    "jumprelu": "jumprelu",
}
# Tensors each SAELens architecture stores (``threshold`` may also be an old ``log_threshold``).
_SAELENS_TENSORS: dict[str, tuple[str, ...]] = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}


# --- export --------------------------------------------------------------------------------------
def _plain(sae: SAE, w_dec: str = "W_dec") -> dict[str, Tensor]:
    """W_enc, b_enc, W_dec, b_dec of a single-encoder SAE (W_dec read from attribute ``w_dec``)."""
    names = {"W_enc": "W_enc", "b_enc": "b_enc", "W_dec": w_dec, "b_dec": "b_dec"}
    return {key: getattr(sae, attr) for key, attr in names.items()}


def _export_relu(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A tied SAE is written untied: W_dec = W_enc^T (``decoder_weight``)."""
    return _plain(sae, w_dec="decoder_weight"), {}


def _export_gated(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    names = _SAELENS_TENSORS["gated"]
    return {name: getattr(sae, name) for name in names}, {}


def _export_topk(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return _plain(sae), {"k": getattr(sae.cfg, "k"), "rescale_acts_by_decoder_norm": False}


def _export_jumprelu(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    return {**_plain(sae), "threshold": getattr(sae, "threshold")}, {}


def _export_batchtopk(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The eval-mode rule pre * 1[pre > theta] as a JumpReLU with theta_i = theta for every i."""
    theta = float(getattr(sae, "threshold"))
    if not (theta >= 0 and math.isfinite(theta)):
        raise ValueError(
            f"Cannot export a BatchTopK SAE with inference threshold {theta}: SAELens's JumpReLU "
            "computes ReLU(pre) * 1[pre > theta], which equals ours only for a finite theta >= 0. "
            "Train it (the threshold is estimated during training) before exporting."
        )
    threshold = torch.full((sae.cfg.d_sae,), theta, dtype=torch.float32)
    return {**_plain(sae), "threshold": threshold}, {}


_EXPORTERS: dict[str, Callable[[SAE], tuple[dict[str, Tensor], dict[str, Any]]]] = {
    "relu": _export_relu,
    "gated": _export_gated,
    "topk": _export_topk,
    "jumprelu": _export_jumprelu,
    "batchtopk": _export_batchtopk,
}


def export_saelens(
    sae: SAE,
    directory: str | Path,
    *,
    hook_name: str = "",
    model_name: str = "",
    extra_metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``sae`` as a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    The folder loads with SAELens's ``SAE.load_from_disk(directory)`` and encodes like ``sae``
    (see the module docstring for the per-architecture mapping). ``hook_name`` / ``model_name``
    go to SAELens's ``metadata`` (used by ``HookedSAETransformer.add_sae``); ``extra_metadata`` is
    merged into it and must be JSON-serialisable. Returns the directory.
    """
    exporter = _EXPORTERS.get(sae.name)
    if exporter is None:
        raise ValueError(
            f"Cannot export architecture {sae.name!r} to the SAELens format. Supported: "
            + ", ".join(f"{ours} (as SAELens {theirs!r})" for ours, theirs in EXPORTS.items())
        )
    extra = dict(extra_metadata or {})
    clashes = sorted(set(extra) & {*_RESERVED_METADATA, "hook_name", "model_name"})
    if clashes:
        raise ValueError(
            f"extra_metadata may not set {clashes}: they are written by export_saelens "
            "(pass hook_name= / model_name= as keyword arguments instead)"
        )
    tensors, arch_fields = exporter(sae)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        **({"model_name": model_name} if model_name else {}),
        **({"hook_name": hook_name} if hook_name else {}),
        **extra,
        OUR_CONFIG_KEY: {"architecture": sae.name, **sae.cfg.to_dict()},
    }
    config = {
        "architecture": EXPORTS[sae.name],
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        **arch_fields,
        "metadata": metadata,
    }
    try:
        text = json.dumps(config, indent=2)
    except TypeError as err:
        raise ValueError(f"extra_metadata must be JSON-serialisable: {err}") from err
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    save_file(weights, str(directory / SAELENS_WEIGHTS_FILE))
    (directory / SAELENS_CONFIG_FILE).write_text(text + "\n")
    return directory


# --- import --------------------------------------------------------------------------------------
def _read_folder(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """cfg.json and the safetensors weights, with clear errors for what is missing."""
    if not directory.is_dir():
        raise FileNotFoundError(f"No SAELens folder at {directory}: it is not a directory.")
    config_path = directory / SAELENS_CONFIG_FILE
    weights_path = directory / SAELENS_WEIGHTS_FILE
    for path in (config_path, weights_path):
        if path.exists():
            continue
        hint = "Point import_saelens at a folder written by SAELens's save_model or export_saelens."
        if (directory / CONFIG_FILE).exists() and (directory / WEIGHTS_FILE).exists():
            hint = "This is a folder in our own format: load it with SAE.load instead."
        elif path == weights_path and any(directory.glob("*.pt*")):
            hint = (
                "Only safetensors weights are read (pickled .pt/.pth files can run code when "
                "loaded); convert the checkpoint to sae_weights.safetensors first."
            )
        raise FileNotFoundError(f"No SAELens SAE at {directory}: missing {path.name}. {hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    return config, load_file(str(weights_path))


def _saelens_architecture(config: dict[str, Any]) -> str:
    """The architecture name, with SAELens's own defaults for pre-6.0 configs."""
    arch = config.get("architecture", "standard")
    activation = config.get("activation_fn", config.get("activation_fn_str", "relu"))
    if activation == "topk" and "k" not in config:
        config["k"] = (config.get("activation_fn_kwargs") or {}).get("k")
        arch = "topk"
    elif arch == "standard" and activation != "relu":
        raise ValueError(
            f"SAELens config has activation_fn={activation!r}; only 'relu' (standard) and "
            "'topk' are supported for pre-6.0 standard SAEs."
        )
    if arch not in IMPORTS:
        raise ValueError(
            f"Unsupported SAELens architecture {arch!r}. Supported: "
            + ", ".join(f"{theirs!r} (as our {ours!r})" for theirs, ours in IMPORTS.items())
        )
    return arch


def _check_input_options(config: dict[str, Any], directory: Path) -> None:
    norm = config.get("normalize_activations") or "none"  # pre-6.0 configs may hold a bool
    if norm is True or norm == "expected_average_only_in":
        warnings.warn(
            f"{directory}: normalize_activations='expected_average_only_in'. The scaling factor "
            "is not part of the folder and SAELens's encode does not apply it either; scale the "
            "inputs yourself (or fold the factor into the weights) as for SAELens.",
            stacklevel=3,
        )
    elif norm != "none":
        raise ValueError(
            f"{directory}: normalize_activations={norm!r} normalises each input inside SAELens's "
            "encode, which our architectures do not do. Supported: 'none', "
            "'expected_average_only_in'."
        )


def _tensors(
    arch: str, state: dict[str, Tensor], config: dict[str, Any], where: Path
) -> dict[str, Tensor]:
    """Check names and shapes, drop an all-ones ``scaling_factor``, cast to float64."""
    state = dict(state)
    scale = state.pop("scaling_factor", None)
    scale = state.pop("finetuning_scaling_factor", scale)
    if scale is not None and not torch.allclose(scale.float(), torch.ones_like(scale.float())):
        raise ValueError(
            f"{where} has a finetuning scaling factor that is not 1; such SAEs are not supported."
        )
    if arch == "jumprelu" and "log_threshold" in state and "threshold" not in state:
        state["threshold"] = state.pop("log_threshold").double().exp()  # pre-6.0 SAELens
    expected = set(_SAELENS_TENSORS[arch])
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{where} does not hold a SAELens {arch!r} SAE: missing tensors {missing}, "
            f"unexpected {unexpected}"
        )
    d_in, d_sae = config.get("d_in"), config.get("d_sae")
    if not isinstance(d_in, int) or not isinstance(d_sae, int):
        raise ValueError(f"{where}/cfg.json must give integer d_in and d_sae, got {d_in}, {d_sae}")
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, tensor in state.items():
        want = shapes.get(name, (d_sae,))
        if tuple(tensor.shape) != want:
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(tensor.shape)}, expected {want} "
                f"for d_in={d_in}, d_sae={d_sae}"
            )
    return {name: tensor.double() for name, tensor in state.items()}


def _fold_inputs(arch: str, t: dict[str, Tensor], config: dict[str, Any]) -> None:
    """In place (float64): make the SAELens encoder an encoder of x - b_dec with plain codes."""
    if not config.get("apply_b_dec_to_input", True):
        shift = t["b_dec"] @ t["W_enc"]  # SAELens encodes x = (x - b_dec) + b_dec
        if arch == "gated":
            t["b_gate"] = t["b_gate"] + shift
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
        else:
            t["b_enc"] = t["b_enc"] + shift
    if arch == "topk" and config.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=1)
        if not bool((norms > 0).all()):
            raise ValueError(
                "rescale_acts_by_decoder_norm=True with a zero decoder row: SAELens's decode "
                "divides by that norm, so the SAE is not well defined."
            )
        t["W_enc"], t["b_enc"] = t["W_enc"] * norms, t["b_enc"] * norms
        t["W_dec"] = t["W_dec"] / norms[:, None]


def _our_config(arch: str, config: dict[str, Any], w_dec: Tensor) -> dict[str, Any]:
    """Our hyperparameters: those stored by export_saelens if they match, else defaults."""
    ours = IMPORTS[arch]
    fields = {f.name for f in dataclasses.fields(get_architecture(ours).config_class)}
    stored = dict((config.get("metadata") or {}).get(OUR_CONFIG_KEY) or {})
    if stored.pop("architecture", None) == ours and set(stored) <= fields:
        hyper = stored
    else:
        hyper = {}
        if "unit_norm_decoder" in fields:
            unit = torch.allclose(w_dec.norm(dim=1), torch.ones(()).double(), atol=_UNIT_NORM_ATOL)
            hyper["unit_norm_decoder"] = unit
    hyper.update(d_in=config["d_in"], d_sae=config["d_sae"])
    if ours == "relu":
        hyper["tied"] = False
    if ours == "topk":
        hyper["k"] = config.get("k")
    return hyper


def import_saelens(directory: str | Path) -> SAE:
    """Read a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) as one of our SAEs.

    The result encodes every input as SAELens's ``encode`` does, up to float rounding (see the
    module docstring for the mapping and the folds). Architectures: "standard" -> relu,
    "gated" -> gated, "topk" -> topk, "jumprelu" -> jumprelu. Only safetensors weights are read.
    """
    directory = Path(directory)
    config, state = _read_folder(directory)
    arch = _saelens_architecture(config)
    _check_input_options(config, directory)
    t = _tensors(arch, state, config, directory)
    _fold_inputs(arch, t, config)
    if arch == "jumprelu":
        t["log_threshold"] = t.pop("threshold").clamp_min(0).log()  # theta <= 0 -> -inf: ReLU
    sae = build_sae(IMPORTS[arch], **_our_config(arch, config, t["W_dec"]))
    target = sae.state_dict()
    if set(target) != set(t):
        raise RuntimeError(f"internal: tensors {sorted(t)} do not match {sorted(target)}")
    sae.load_state_dict({name: t[name].to(target[name].dtype) for name in target})
    return sae
