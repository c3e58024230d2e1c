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
    matryoshka   ->   "jumprelu"     the same inference rule z = ReLU(pre) * 1[pre > theta] (paper
                                     22); SAELens saves its "matryoshka_batchtopk" SAEs this way
                                     (only its training class has that architecture name).
    decoder (all):                   x_hat = W_dec^T z + b_dec

Input scale (``normalize_activations``). Our SAEs work on ``c x`` with ``c = cfg.input_scale``
(``SAE.scale_in``) and return ``x_hat / c`` (``SAE.scale_out``): for raw x,

    z = f(W_enc^T (c x - b_dec) + b_enc),     x_hat = (W_dec^T z + b_dec) / c.

SAELens's ``load_from_disk`` applies no input scaling, so ``c`` is folded into the exported
weights, exactly as SAELens's own ``fold_activation_norm_scaling_factor`` does:

    W_enc' = c W_enc,   b_dec' = b_dec / c,   W_dec' = W_dec / c,   everything else unchanged,

since ``W_enc'^T (x - b_dec') = W_enc^T (c x - b_dec)`` (so every pre-activation, gated's pi_gate
and pi_mag = (exp(r_mag) * W_enc')^T (x - b_dec') + b_mag included, is unchanged: b_enc, b_gate,
r_mag, b_mag, the JumpReLU/BatchTopK thresholds and the TopK selection stay as they are, and the
codes z are ours) and ``W_dec'^T z + b_dec' = (W_dec^T z + b_dec) / c``. The folder says
``normalize_activations: "none"``: SAELens's encode/decode on raw x give our z and x_hat. The
exported decoder rows have norm ``||W_dec[i]|| / c``, not 1; that is harmless for the "topk"
export because we write ``rescale_acts_by_decoder_norm: false`` (also SAELens's default), so
SAELens selects on the plain pre-activations. ``c`` is recorded in
``metadata["sae_replications_input_scale"]``; import unfolds it (``W_enc = W_enc' / c``,
``b_dec = c b_dec'``, ``W_dec = c W_dec'``, ``input_scale = c``), which gives back our SAE with
unit-norm decoder rows and the same raw x -> x_hat. Folders without that key are read with
``input_scale = 1`` and the weights as they are, except old exports of ours (written before the
fold, with a stored ``input_scale != 1``): their weights are in the SAE's units, so they are read
with the stored ``input_scale`` and a warning (SAELens itself reads such a folder wrongly).

Details of the mapping:

* Tied ReLU SAEs are written untied (W_dec = W_enc^T); they come back as untied ``relu`` SAEs.
* JumpReLU: we train ``log_threshold``; SAELens stores ``threshold = exp(log_threshold)``. SAELens
  encodes ``ReLU(pre) * 1[pre > threshold]``, which equals ``pre * 1[pre > max(threshold, 0)]``;
  on import ``log_threshold = log(max(threshold, 0))``, i.e. ``-inf`` (a plain ReLU) where the
  stored threshold is <= 0. Old SAELens folders holding ``log_threshold`` are read as well.
* BatchTopK / Matryoshka: only the eval-mode rule is exported (a trained SAE has theta >= 0; an
  untrained one, theta < 0 or not finite, is refused). They come back as ``jumprelu`` SAEs.
* TopK: SAELens takes the top k of ``pre`` then a ReLU; we take the top k of ``ReLU(pre)``. Both
  keep the same positive values at the same places. SAELens's ``rescale_acts_by_decoder_norm``
  (select on ``pre * ||W_dec[i]||``, decode ``z / ||W_dec[i]||``) is folded on import:
  ``W_enc[:, i] *= n_i, b_enc[i] *= n_i, W_dec[i] /= n_i`` gives identical codes and outputs
  (this and the next fold come first: they turn the folder into a plain SAELens SAE of raw x,
  which the input scale above is then unfolded from).
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
  to whether the (unfolded) decoder rows have unit norm.

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
# The input scale c folded into the exported weights (see the module docstring).
INPUT_SCALE_KEY = "sae_replications_input_scale"
_RESERVED_METADATA = (
    "sae_lens_version",
    "sae_lens_training_version",
    OUR_CONFIG_KEY,
    INPUT_SCALE_KEY,
)
_UNIT_NORM_ATOL = 1e-4

# Our architecture -> the SAELens architecture it is exported as.
EXPORTS: dict[str, str] = {
    "relu": "standard",
    "gated": "gated",
    "topk": "topk",
    "jumprelu": "jumprelu",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
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


def _export_threshold_rule(sae: SAE) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """BatchTopK / Matryoshka: the eval-mode rule z = ReLU(pre) * 1[pre > theta] (one scalar
    theta, estimated in training) as a JumpReLU with theta_i = theta for every latent i."""
    theta = float(getattr(sae, "threshold"))
    if not (theta >= 0 and math.isfinite(theta)):
        raise ValueError(
            f"Cannot export a {sae.name} SAE with inference threshold {theta}: SAELens's JumpReLU "
            "computes ReLU(pre) * 1[pre > theta], which equals ours only for a finite theta >= 0. "
            "Train it (the threshold is estimated during training) before exporting."
        )
    threshold = torch.full((sae.cfg.d_sae,), theta, dtype=torch.float32)
    return {**_plain(sae), "threshold": threshold}, {}


def fold_input_scale(tensors: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """Weights for raw inputs from weights for ``scale * x`` (float64):

        W_enc' = c W_enc,   b_dec' = b_dec / c,   W_dec' = W_dec / c   (c = ``scale``),

    so that W_enc'^T (x - b_dec') = W_enc^T (c x - b_dec) and W_dec'^T z + b_dec' =
    (W_dec^T z + b_dec) / c. Other tensors (biases of the latents, r_mag, thresholds) are kept.
    """
    out = {k: v.detach().double() for k, v in tensors.items()}
    out["W_enc"] = out["W_enc"] * scale
    out["b_dec"], out["W_dec"] = out["b_dec"] / scale, out["W_dec"] / scale
    return out


def unfold_input_scale(tensors: Mapping[str, Tensor], scale: float) -> dict[str, Tensor]:
    """The inverse of ``fold_input_scale``: W_enc = W_enc' / c, b_dec = c b_dec',
    W_dec = c W_dec' (float64)."""
    out = {k: v.detach().double() for k, v in tensors.items()}
    out["W_enc"] = out["W_enc"] / scale
    out["b_dec"], out["W_dec"] = out["b_dec"] * scale, out["W_dec"] * scale
    return out


_EXPORTERS: dict[str, Callable[[SAE], tuple[dict[str, Tensor], dict[str, Any]]]] = {
    "relu": _export_relu,
    "gated": _export_gated,
    "topk": _export_topk,
    "jumprelu": _export_jumprelu,
    "batchtopk": _export_threshold_rule,
    "matryoshka": _export_threshold_rule,
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

    The folder loads with SAELens's ``SAE.load_from_disk(directory)`` and, on raw activations x,
    gives the codes z and reconstruction x_hat of ``sae`` (``sae.scale_out(sae(sae.scale_in(x)))``):
    the input scale c is folded into the weights (W_enc' = c W_enc, b_dec' = b_dec / c,
    W_dec' = W_dec / c), so the decoder rows have norm 1 / c. See the module docstring for the
    per-architecture mapping. ``hook_name`` / ``model_name``
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
    scale = float(sae.cfg.input_scale)
    tensors = fold_input_scale(tensors, scale)
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,
        **({"model_name": model_name} if model_name else {}),
        **({"hook_name": hook_name} if hook_name else {}),
        **extra,
        OUR_CONFIG_KEY: {"architecture": sae.name, **sae.cfg.to_dict()},
        INPUT_SCALE_KEY: scale,
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


def _input_scale(config: dict[str, Any], where: Path) -> tuple[float, bool]:
    """``(c, folded)``: the input scale of the SAE in the folder, and whether the weights hold it
    folded in (exports of ours record it; see the module docstring). Without a record: 1."""
    metadata = config.get("metadata") or {}
    if INPUT_SCALE_KEY in metadata:
        scale = metadata[INPUT_SCALE_KEY]
        number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
        if not (number and scale > 0 and math.isfinite(scale)):
            raise ValueError(
                f"{where}/cfg.json: metadata.{INPUT_SCALE_KEY} must be a finite number > 0, got "
                f"{scale!r}; re-export the SAE with export_saelens."
            )
        return float(scale), True
    stored = (metadata.get(OUR_CONFIG_KEY) or {}).get("input_scale", 1.0)
    if isinstance(stored, (int, float)) and not isinstance(stored, bool) and stored > 0:
        if stored != 1.0:
            warnings.warn(
                f"{where} was exported before export_saelens folded the input scale: its weights "
                f"expect inputs scaled by input_scale={stored}, which SAELens does not apply, so "
                "SAELens reads this folder wrongly. Importing it with that input_scale; re-export "
                "it to fix the folder.",
                stacklevel=3,
            )
        return float(stored), False
    return 1.0, False


def _our_config(
    arch: str, config: dict[str, Any], w_dec: Tensor, input_scale: float = 1.0
) -> dict[str, Any]:
    """Our hyperparameters: those stored by export_saelens if they match, else defaults; the
    input scale is always ``input_scale``."""
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
    hyper.update(d_in=config["d_in"], d_sae=config["d_sae"], input_scale=input_scale)
    if ours == "relu":
        hyper["tied"] = False
    if ours == "topk":
        hyper["k"] = config.get("k")
    return hyper


def import_saelens(directory: str | Path) -> SAE:
    """Read a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) as one of our SAEs.

    The result maps raw inputs x to the codes and reconstruction of SAELens's ``encode`` /
    ``decode``, up to float rounding (see the module docstring for the mapping and the folds; an
    input scale folded in by ``export_saelens`` is unfolded into ``cfg.input_scale``).
    Architectures: "standard" -> relu, "gated" -> gated, "topk" -> topk, "jumprelu" -> jumprelu.
    Only safetensors weights are read.
    """
    directory = Path(directory)
    config, state = _read_folder(directory)
    arch = _saelens_architecture(config)
    _check_input_options(config, directory)
    t = _tensors(arch, state, config, directory)
    _fold_inputs(arch, t, config)
    scale, folded = _input_scale(config, directory)
    if folded:
        t = unfold_input_scale(t, scale)
    if arch == "jumprelu":
        t["log_threshold"] = t.pop("threshold").clamp_min(0).log()  # theta <= 0 -> -inf: ReLU
    sae = build_sae(IMPORTS[arch], **_our_config(arch, config, t["W_dec"], scale))
    target = sae.state_dict()
    if set(target) != set(t):
        raise RuntimeError(f"internal: tensors {sorted(t)} do not match {sorted(target)}")
    sae.load_state_dict({name: t[name].to(target[name].dtype) for name in target})
    return sae
