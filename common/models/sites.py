"""One vocabulary of named hook sites for every supported model.

Transformers (block ``L`` counted from 0; residual update x_{L+1} = x_L + attn_L + mlp_L, or the
post-LN / parallel variants of BERT and GPT-NeoX):

=================  ==========================================================  ==============
site               tensor                                                      hook
=================  ==========================================================  ==============
``resid_post.L``   residual stream after block L (= ``hidden_states[L + 1]``)  block output
``mlp_out.L``      what the MLP of block L writes into the residual stream     MLP output
``attn_z.L``       z_cat: concatenated per-head attention outputs before W_O   W_O input
                   (Kissane et al., paper 6)
``mlp_hidden.L``   MLP hidden activations phi(x W_K + b_K), the "keys" of the  W_V input
                   FF key-value memory (paper 39); W_V = down_proj / c_proj
=================  ==========================================================  ==============

``hidden_states[L + 1]`` means transformers' ``output_hidden_states=True``; for the last block of
a pre-LN model that entry is after the final norm, while ``resid_post`` is before it.

CNN (EfficientNet): ``block.L`` is the output of MBConv block L and ``features`` the final
1280-channel feature map (after the head conv, BN and activation). Each spatial position is a
token: (B, C, H, W) -> (B*H*W, C), see ``tokens_from``.

``resolve_site(model, "attn_z.3")`` returns a ``ResolvedSite`` (module, hook kind, how to pull the
tensor); ``list_sites(model)`` lists every name. An unknown site or layer fails with the list.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

SITE_KINDS = ("resid_post", "mlp_out", "attn_z", "mlp_hidden")
CNN_SITE_KINDS = ("block", "features")


@dataclass(frozen=True)
class _Layout:
    """Where the sites live in one architecture: module paths relative to a block.

    ``(path, "output")`` hooks the module's output, ``(path, "input")`` its first input.
    ``path == ""`` is the block itself.
    """

    layers: str
    resid_post: tuple[str, str]
    mlp_out: tuple[str, str]
    attn_z: tuple[str, str]
    mlp_hidden: tuple[str, str]


_BLOCK_OUT = ("", "output")
# model_type (config.json) -> layout. Gemma's MLP is followed by a norm inside the block, so what
# it adds to the residual is the output of ``post_feedforward_layernorm``.
LAYOUTS: dict[str, _Layout] = {
    "llama": _Layout(
        "layers",
        _BLOCK_OUT,
        ("mlp", "output"),
        ("self_attn.o_proj", "input"),
        ("mlp.down_proj", "input"),
    ),
    "gemma3_text": _Layout(
        "layers",
        _BLOCK_OUT,
        ("post_feedforward_layernorm", "output"),
        ("self_attn.o_proj", "input"),
        ("mlp.down_proj", "input"),
    ),
    "gpt2": _Layout(
        "h",
        _BLOCK_OUT,
        ("mlp", "output"),
        ("attn.c_proj", "input"),
        ("mlp.c_proj", "input"),
    ),
    "gpt_neox": _Layout(
        "layers",
        _BLOCK_OUT,
        ("mlp", "output"),
        ("attention.dense", "input"),
        ("mlp.dense_4h_to_h", "input"),
    ),
    # BERT is post-LN: the FF output dense(h) is added to the residual before LayerNorm.
    "bert": _Layout(
        "encoder.layer",
        _BLOCK_OUT,
        ("output.dense", "output"),
        ("attention.output.dense", "input"),
        ("output.dense", "input"),
    ),
    "clip_vision_model": _Layout(
        "encoder.layers",
        _BLOCK_OUT,
        ("mlp", "output"),
        ("self_attn.out_proj", "input"),
        ("mlp.fc2", "input"),
    ),
}


@dataclass(frozen=True)
class ResolvedSite:
    """A named site bound to one module of one model.

    ``kind == "output"``: the tensor is the module's output (first element of a tuple);
    ``kind == "input"``: its first positional input (forward pre-hook).
    ``layout``: ``"sequence"`` tensors are (B, T, d); ``"spatial"`` ones (B, C, H, W).
    ``transform`` is applied after pulling (EfficientNet's head activation).
    """

    name: str
    module: nn.Module
    kind: Literal["output", "input"]
    layout: Literal["sequence", "spatial"]
    layer: int
    transform: Callable[[Tensor], Tensor] | None = None

    def pull(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any = None) -> Tensor:
        """The site's tensor from a hook's arguments (pre-hook: ``output`` unused)."""
        if self.kind == "input":
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
        else:
            x = output[0] if isinstance(output, (tuple, list)) else output
        return self.transform(x) if self.transform is not None else x

    def register(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(tensor)`` each time the module runs; remove with ``handle.remove()``."""
        if self.kind == "input":

            def pre_hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                fn(self.pull(args, kwargs))

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            fn(self.pull(args, {}, output))

        return self.module.register_forward_hook(hook)


def tokens_from(x: Tensor, layout: str) -> Tensor:
    """Activations as tokens: (B, T, d) -> (B, T, d) unchanged; (B, C, H, W) -> (B, H*W, C).

    Callers flatten the first two dimensions (after masking positions) to get (n_tokens, d).
    """
    if layout == "spatial":
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return x


def _unwrap(model: Any) -> nn.Module:
    return model.model if hasattr(model, "family") and hasattr(model, "revision") else model


def _is_efficientnet(model: nn.Module) -> bool:
    return hasattr(model, "_blocks") and hasattr(model, "_conv_head") and hasattr(model, "_bn1")


def model_type(model: nn.Module) -> str:
    """``config.model_type`` of a transformers model, ``"efficientnet"`` for the CNN."""
    model = _unwrap(model)
    if _is_efficientnet(model):
        return "efficientnet"
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) is None:
        raise TypeError(
            f"{type(model).__name__} is not a supported model (no config.model_type); supported: "
            f"transformers {sorted(LAYOUTS)} and EfficientNet; load it with "
            "common.models.load_model."
        )
    return config.model_type


def block_list(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks (or EfficientNet MBConv blocks), in forward order."""
    model = _unwrap(model)
    kind = model_type(model)
    if kind == "efficientnet":
        return model._blocks
    if kind not in LAYOUTS:
        raise ValueError(
            f"no hook-site table for model_type {kind!r}; supported: {sorted(LAYOUTS)} and "
            "EfficientNet. Add its module paths to common.models.sites.LAYOUTS."
        )
    suffix = LAYOUTS[kind].layers
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and (name == suffix or name.endswith("." + suffix))
    ]
    if not candidates:
        raise ValueError(f"{type(model).__name__}: no block list named '*{suffix}' found")
    return min(candidates, key=lambda nm: len(nm[0]))[1]


def n_layers(model: nn.Module) -> int:
    return len(block_list(model))


def list_sites(model: nn.Module) -> list[str]:
    """Every valid site name for ``model``, in forward order within each layer."""
    model = _unwrap(model)
    n = n_layers(model)
    if model_type(model) == "efficientnet":
        return [f"block.{i}" for i in range(n)] + ["features"]
    order = ("attn_z", "mlp_hidden", "mlp_out", "resid_post")
    return [f"{kind}.{i}" for i in range(n) for kind in order]


def _valid_sites_text(model: nn.Module) -> str:
    n = n_layers(model)
    if model_type(model) == "efficientnet":
        return f"block.{{0..{n - 1}}}, features"
    return ", ".join(f"{kind}.{{0..{n - 1}}}" for kind in SITE_KINDS)


def _submodule(block: nn.Module, path: str) -> nn.Module:
    return block.get_submodule(path) if path else block


def resolve_site(model: nn.Module, site: str) -> ResolvedSite:
    """Bind a site name to a module and a hook kind (see the module docstring for the names)."""
    model = _unwrap(model)
    blocks = block_list(model)
    kind = model_type(model)

    def bad(why: str) -> ValueError:
        return ValueError(
            f"{why} for {type(model).__name__} ({kind}, {len(blocks)} layers); valid sites: "
            f"{_valid_sites_text(model)}"
        )

    if not isinstance(site, str):
        raise bad(f"site must be a string like 'resid_post.3', got {site!r}")
    if kind == "efficientnet":
        if site == "features":
            # extract_features ends with swish(bn1(conv_head(x))); the swish module is shared with
            # the stem, so hook bn1 and apply the activation ourselves.
            return ResolvedSite(site, model._bn1, "output", "spatial", len(blocks), model._swish)
        match = re.fullmatch(r"block\.(\d+)", site)
        if match is None:
            raise bad(f"unknown site {site!r}")
        layer = int(match.group(1))
        if layer >= len(blocks):
            raise bad(f"layer {layer} out of range in {site!r}")
        return ResolvedSite(site, blocks[layer], "output", "spatial", layer)

    match = re.fullmatch(r"(\w+)\.(\d+)", site)
    if match is None or match.group(1) not in SITE_KINDS:
        raise bad(f"unknown site {site!r}")
    name, layer = match.group(1), int(match.group(2))
    if layer >= len(blocks):
        raise bad(f"layer {layer} out of range in {site!r}")
    path, hook_kind = getattr(LAYOUTS[kind], name)
    module = _submodule(blocks[layer], path)
    return ResolvedSite(site, module, hook_kind, "sequence", layer)  # type: ignore[arg-type]


def site_name_error(site: Any, *, cnn: bool = False, n_layers: int | None = None) -> str | None:
    """Why ``site`` is not a site name, or ``None`` when it is one; no model is loaded.

    Transformer sites are ``<kind>.<layer>`` with ``kind`` in ``SITE_KINDS``; EfficientNet sites
    (``cnn=True``) are ``block.<layer>`` or ``features``. ``n_layers``, when known, bounds the
    layer to ``0 .. n_layers - 1``; ``resolve_site`` checks the same against the loaded model.
    """
    if not isinstance(site, str):
        return f"a site is a string such as 'resid_post.3', not {type(site).__name__}"
    kinds = ("block",) if cnn else SITE_KINDS
    if cnn and site == "features":
        return None
    match = re.fullmatch(r"(\w+)\.(\d+)", site)
    if match is None or match.group(1) not in kinds:
        digits = re.search(r"\d+$", site)
        candidates = [f"{kind}.{digits.group() if digits else 0}" for kind in kinds]
        close = difflib.get_close_matches(site, [*candidates, *(["features"] if cnn else [])], 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown site {site!r}{hint}"
    layer = int(match.group(2))
    if n_layers is not None and layer >= n_layers:
        return f"layer {layer} is out of range in {site!r}: the model has layers 0..{n_layers - 1}"
    return None
