"""The one hook layer: name a site of any model we load, capture its tensor or replace it.

Every reader and writer of activations goes through here: activation extraction, the downstream
splice (CE loss with an SAE in the forward pass), absorption, the diffusion papers' edits and the
paper notebooks. One vocabulary of site names, one resolver (``resolve_site``), three verbs:

* ``capture(model, sites)``: a context manager that records the tensor of every site each time the
  model runs (``cap[site]`` is the list of tensors, one per call; ``cap.meta[site]`` per-call
  metadata such as a U-Net call's timesteps, see ``CallContext``);
* ``run_until(model, sites, *args, **kwargs)``: one forward pass that stops as soon as every site
  has fired (the layers after the last site are skipped) and returns ``{site: tensor}``;
* ``replace(model, site, fn)``: a context manager under which the site's tensor ``a`` is replaced by
  ``fn(a)`` in every forward pass (for a U-Net block's residual update, ``h + fn(delta)``).

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
a pre-LN model that entry is after the final norm, while ``resid_post`` is before it. A hub CLIP's
sites are those of its vision transformer (``clip_vision_model``).

CNN (EfficientNet, also the image tower of the CLIP-style model): ``block.L`` is the output of
MBConv block L and ``features`` the final 1280-channel feature map (after the head conv, BN and
activation). Each spatial position is a token: (B, C, H, W) -> (B*H*W, C), see ``tokens_from``.

U-Nets (diffusers ``UNet2DConditionModel``): ``unet.<path>`` names a cross-attention
``Transformer2DModel`` (``unet.up_blocks.0.attentions.1``, ...). Its tensor is, by default, the
block's residual update delta = block(h) - h (``value="update"``, paper 37) or the block's output
(``value="output"``, SAeUron, paper 17).

``resolve_site(model, "attn_z.3")`` returns a ``Site`` (module, hook kind, how to read and write
the tensor); ``list_sites(model)`` lists every name. An unknown site or layer fails with the list.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
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


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early (``run_until``, ``capture(stop=...)``)."""


SiteValue = Literal["output", "update"]


@dataclass(frozen=True)
class Site:
    """A named site bound to one module of one model.

    ``kind == "output"``: the tensor is the module's output (first element of a tuple, or a
    diffusers output's ``.sample``); ``kind == "input"``: its first input (a forward pre-hook).
    ``layout``: ``"sequence"`` tensors are (B, T, d); ``"spatial"`` ones (B, C, H, W).
    ``value == "update"`` (output sites only): the tensor is output - input, the block's residual
    update, and writing ``new`` makes the output input + new.
    ``transform`` is applied after reading (EfficientNet's head activation); such a site is
    read-only.
    """

    name: str
    module: nn.Module
    kind: Literal["output", "input"]
    layout: Literal["sequence", "spatial"]
    layer: int
    transform: Callable[[Tensor], Tensor] | None = None
    value: SiteValue = "output"

    # --- reading and writing the tensor from a hook's arguments ----------------------------------
    def _input(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        if args:
            return args[0]
        return kwargs.get(
            "hidden_states", next(v for v in kwargs.values() if isinstance(v, Tensor))
        )

    @staticmethod
    def _output(output: Any) -> Tensor:
        if isinstance(output, (tuple, list)):
            return output[0]
        return output.sample if hasattr(output, "sample") else output

    def read(self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any = None) -> Tensor:
        """The site's tensor from a hook's arguments (a pre-hook: ``output`` unused)."""
        if self.kind == "input":
            x = self._input(args, kwargs)
        else:
            x = self._output(output)
            if self.value == "update":
                x = x - self._input(args, kwargs)
        return self.transform(x) if self.transform is not None else x

    def write_output(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any, new: Tensor
    ) -> Any:
        """The module output with the site's tensor replaced by ``new`` (an output site)."""
        if self.value == "update":  # y + (new - delta): an unchanged delta leaves y bit for bit
            y_old = self._output(output)
            y = y_old + (new - (y_old - self._input(args, kwargs)))
        else:
            y = new
        if isinstance(output, tuple):
            return (y, *output[1:])
        if isinstance(output, list):
            return [y, *output[1:]]
        if hasattr(output, "sample"):
            output.sample = y
            return output
        return y

    def write_input(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], new: Tensor
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The module's arguments with its first input replaced by ``new`` (an input site)."""
        if args:
            return (new, *args[1:]), kwargs
        key = (
            "hidden_states"
            if "hidden_states" in kwargs
            else next(k for k, v in kwargs.items() if isinstance(v, Tensor))
        )
        return args, {**kwargs, key: new}

    # --- hooks ---------------------------------------------------------------------------------
    def register(self, fn: Callable[[Tensor], None]) -> RemovableHandle:
        """Call ``fn(tensor)`` each time the module runs; remove with ``handle.remove()``."""
        if self.kind == "input":

            def pre_hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                fn(self.read(args, kwargs))

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            fn(self.read(args, kwargs, output))

        return self.module.register_forward_hook(hook, with_kwargs=True)

    def register_replacement(self, fn: Callable[[Tensor], Tensor]) -> RemovableHandle:
        """Replace the site's tensor ``a`` by ``fn(a)`` each time the module runs."""
        if self.transform is not None:
            raise ValueError(f"site {self.name!r} is read-only (its tensor is transformed)")
        if self.kind == "input":

            def pre_hook(
                _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
            ) -> tuple[tuple[Any, ...], dict[str, Any]]:
                return self.write_input(args, kwargs, fn(self.read(args, kwargs)))

            return self.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            return self.write_output(args, kwargs, output, fn(self.read(args, kwargs, output)))

        return self.module.register_forward_hook(hook, with_kwargs=True)


def tokens_from(x: Tensor, layout: str) -> Tensor:
    """Activations as tokens: (B, T, d) -> (B, T, d) unchanged; (B, C, H, W) -> (B, H*W, C).

    Callers flatten the first two dimensions (after masking positions) to get (n_tokens, d).
    """
    if layout == "spatial":
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return x


SITE_PREFIX_UNET = "unet."


def _unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` whose sites a model object names.

    A ``LoadedModel`` -> its model; the CLIP-style model -> its image tower's EfficientNet; a hub
    CLIP -> its vision transformer; a ``DiffusionModel`` -> its U-Net.
    """
    if hasattr(model, "family") and hasattr(model, "revision") and hasattr(model, "model"):
        return model.model  # LoadedModel
    if hasattr(model, "unet") and hasattr(model, "scheduler"):
        return model.unet  # DiffusionModel
    tower = getattr(model, "image_tower", None)
    if tower is not None and tower is not model and hasattr(tower, "loaded"):
        return tower.loaded.model  # CLIP-style: the EfficientNet image tower
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "vision_model") and hasattr(model, "tokenizer"):
        return inner.vision_model  # HubCLIP
    return model


def is_unet(model: Any) -> bool:
    """A diffusers U-Net (or a model object holding one)."""
    net = _unwrap(model)
    return type(net).__name__ == "UNet2DConditionModel" or (
        hasattr(net, "down_blocks") and hasattr(net, "up_blocks") and hasattr(net, "mid_block")
    )


_GROUP_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def list_unet_sites(unet: Any) -> list[str]:
    """``unet.<path>`` of every cross-attention ``Transformer2DModel``, in forward order."""
    net = _unwrap(unet)
    names = [n for n, m in net.named_modules() if type(m).__name__ == "Transformer2DModel"]
    names.sort(key=lambda name: _GROUP_ORDER.get(name.split(".")[0], 3))  # stable within a group
    return [SITE_PREFIX_UNET + name for name in names]


def _resolve_unet_site(unet: nn.Module, site: str, value: SiteValue) -> Site:
    if value not in ("update", "output"):
        raise ValueError(
            f"value must be 'update' (delta = block(h) - h, paper 37) or 'output' (block(h), the "
            f"feature map SAeUron reads), got {value!r}"
        )
    valid = list_unet_sites(unet)
    if site not in valid:
        close = difflib.get_close_matches(str(site), valid, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown U-Net site {site!r}.{hint} Valid sites: {', '.join(valid)}")
    module = unet.get_submodule(site[len(SITE_PREFIX_UNET) :])
    return Site(site, module, "output", "spatial", valid.index(site), value=value)


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
            "EfficientNet. Add its module paths to common.hooks.LAYOUTS."
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


def list_sites(model: Any) -> list[str]:
    """Every valid site name for ``model``, in forward order within each layer."""
    if is_unet(model):
        return list_unet_sites(model)
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


def resolve_site(model: Any, site: str | Site, value: SiteValue | None = None) -> Site:
    """Bind a site name to a module and a hook kind (see the module docstring for the names).

    ``model``: any model object we load (see ``_unwrap``); a ``Site`` is returned as it is.
    ``value``: for U-Net sites, ``"update"`` (the default) or ``"output"``.
    """
    if isinstance(site, Site):
        return site
    if is_unet(model):
        return _resolve_unet_site(_unwrap(model), site, value or "update")
    if value not in (None, "output"):
        raise ValueError(f"value={value!r} applies to U-Net sites only, not to {site!r}")
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
            return Site(site, model._bn1, "output", "spatial", len(blocks), model._swish)
        match = re.fullmatch(r"block\.(\d+)", site)
        if match is None:
            raise bad(f"unknown site {site!r}")
        layer = int(match.group(1))
        if layer >= len(blocks):
            raise bad(f"layer {layer} out of range in {site!r}")
        return Site(site, blocks[layer], "output", "spatial", layer)

    match = re.fullmatch(r"(\w+)\.(\d+)", site)
    if match is None or match.group(1) not in SITE_KINDS:
        raise bad(f"unknown site {site!r}")
    name, layer = match.group(1), int(match.group(2))
    if layer >= len(blocks):
        raise bad(f"layer {layer} out of range in {site!r}")
    path, hook_kind = getattr(LAYOUTS[kind], name)
    module = _submodule(blocks[layer], path)
    return Site(site, module, hook_kind, "sequence", layer)  # type: ignore[arg-type]


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


# --- the three verbs -----------------------------------------------------------------------------
class CallContext:
    """Per-call metadata for captured tensors: ``describe(site, tensor) -> {name: tensor}``.

    ``attach(model)`` / ``detach()`` bracket a capture (e.g. a pre-hook that records a U-Net
    call's timesteps, ``common.models.diffusion.hooks.UNetCallContext``).
    """

    def attach(self, model: nn.Module) -> None:
        """Start observing ``model`` (default: nothing to observe)."""

    def detach(self) -> None:
        """Stop observing."""

    def describe(self, site: Site, tensor: Tensor) -> dict[str, Tensor]:
        return {}


class Capture:
    """Records the tensor of each site every time the model runs (see ``capture``).

    ``cap[site]``: the list of tensors, one per call (detached; moved to ``to`` if given);
    ``cap.meta[site]``: per call, what ``context.describe`` said (``{}`` without a context).
    ``stop``: raise ``StopForward`` once every site has fired in a call (the caller catches it;
    ``run_until`` does). ``keep(site, tensor, meta)``: record only the calls it accepts.
    ``transform(site, tensor)``: applied before recording (e.g. ``tokens_from``).
    """

    def __init__(
        self,
        model: Any,
        sites: Sequence[str | Site],
        *,
        value: SiteValue | None = None,
        stop: bool = False,
        to: str | torch.device | None = None,
        context: CallContext | None = None,
        keep: Callable[[str, Tensor, dict[str, Tensor]], bool] | None = None,
        transform: Callable[[Site, Tensor], Tensor] | None = None,
    ) -> None:
        if not sites:
            raise ValueError("capture needs at least one site")
        self.model = model
        self.sites: dict[str, Site] = {}
        for s in sites:
            resolved = resolve_site(model, s, value)
            self.sites[resolved.name] = resolved
        self.stop, self.to, self.context = stop, to, context
        self.keep, self.transform = keep, transform
        self.tensors: dict[str, list[Tensor]] = {name: [] for name in self.sites}
        self.meta: dict[str, list[dict[str, Tensor]]] = {name: [] for name in self.sites}
        self._fired: set[str] = set()
        self._handles: list[RemovableHandle] = []

    def __getitem__(self, site: str) -> list[Tensor]:
        if site not in self.tensors:
            raise KeyError(f"site {site!r} was not captured; captured: {list(self.tensors)}")
        return self.tensors[site]

    def last(self, site: str) -> Tensor:
        """The tensor of the latest call at ``site``."""
        tensors = self[site]
        if not tensors:
            raise RuntimeError(f"nothing captured at {site!r}: run the model inside `with`")
        return tensors[-1]

    def clear(self) -> None:
        for name in self.sites:
            self.tensors[name].clear()
            self.meta[name].clear()
        self._fired.clear()

    def _record(self, site: Site) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            meta = self.context.describe(site, x) if self.context is not None else {}
            if self.keep is None or self.keep(site.name, x, meta):
                x = x.detach()
                if self.transform is not None:
                    x = self.transform(site, x)
                self.tensors[site.name].append(x if self.to is None else x.to(self.to))
                self.meta[site.name].append(meta)
            self._fired.add(site.name)
            if self.stop and len(self._fired) == len(self.sites):
                self._fired.clear()
                raise StopForward

        return fn

    def __enter__(self) -> Capture:
        if self.context is not None:
            self.context.attach(_unwrap(self.model))
        self._handles = [site.register(self._record(site)) for site in self.sites.values()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.context is not None:
            self.context.detach()


def capture(model: Any, sites: Sequence[str | Site], **options: Any) -> Capture:
    """``with capture(model, ["resid_post.3"]) as cap: model(...)``, then ``cap["resid_post.3"]``.

    Options as ``Capture``'s (``value``, ``stop``, ``to``, ``context``, ``keep``, ``transform``).
    """
    return Capture(model, sites, **options)


def run_until(
    model: Any, sites: Sequence[str | Site], forward: Callable[[], Any]
) -> dict[str, Tensor]:
    """Run ``forward()`` (a call of ``model``) until every site has fired; ``{site: tensor}``.

    The layers after the last site are skipped (``StopForward``), so asking for an early layer
    of a deep model costs only the layers up to it.
    """
    with Capture(model, sites, stop=True) as cap:
        try:
            forward()
        except StopForward:
            pass
    missing = [name for name, tensors in cap.tensors.items() if not tensors]
    if missing:
        raise RuntimeError(f"the forward pass never reached site(s) {missing}")
    return {name: tensors[0] for name, tensors in cap.tensors.items()}


@contextmanager
def replace(
    model: Any,
    site: str | Site,
    fn: Callable[[Tensor], Tensor],
    *,
    value: SiteValue | None = None,
) -> Iterator[Site]:
    """Inside ``with``, the tensor ``a`` at ``site`` is replaced by ``fn(a)`` in every forward pass.

    An output site rewrites the module's output (the first element of a tuple); an input site its
    first input (a forward pre-hook); a U-Net site with ``value="update"`` its residual update,
    written as y + (fn(delta) - delta) so that the identity leaves the output bit for bit.
    """
    resolved = resolve_site(model, site, value)
    handle = resolved.register_replacement(fn)
    try:
        yield resolved
    finally:
        handle.remove()
