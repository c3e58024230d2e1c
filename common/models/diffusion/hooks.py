"""U-Net hook sites on the one hook layer (``common.hooks``), each token with its timestep.

The sites are ``unet.<module path>`` of every cross-attention ``Transformer2DModel`` (the same
names work on Stable Diffusion's U-Net), e.g. ``unet.up_blocks.1.attentions.0``, resolved by
``common.hooks.resolve_site``. The activation is the block's *residual update* (paper 37)::

    delta = Transformer2DModel(h) - h        (B, C, H, W)

where h is the block's input feature map (the output of the ResNet block before it) and the output
already includes the block's internal skip connection (output = proj_out(transformer(proj_in(
norm(h)))) + h); ``value="output"`` reads the block output itself (SAeUron, paper 17). Each spatial
position of each image at each denoising step is one token (B*H*W, C), recorded with its timestep
and the caption its row draws (papers 17 and 37): ``capture_sites`` records them,
``replace_site`` swaps delta for f(delta, t) (SAE reconstructions, edited codes).

``UNetCallContext`` is the per-call metadata of ``common.hooks.capture``: a forward pre-hook on
the U-Net records each call's timesteps, and ``sample`` says which caption each row of the call
draws (``captions_of_rows``, a context variable), so hooks need no particular batching.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from common.hooks import (
    CallContext,
    Capture,
    Site,
    SiteValue,
    list_unet_sites,
    replace,
    resolve_site,
    tokens_from,
)

SITE_VALUES = ("update", "output")

# Index (into ``sample``'s captions) of the caption each row of the U-Net call in progress draws,
# -1 for the unconditional rows of guidance; None outside ``sample``.
_CALL_CAPTIONS: ContextVar[Tensor | None] = ContextVar("call_captions", default=None)


@contextmanager
def captions_of_rows(caption_of_row: Tensor) -> Iterator[None]:
    """Inside ``with``, U-Net calls draw caption ``caption_of_row[r]`` in row r (``sample``)."""
    token = _CALL_CAPTIONS.set(caption_of_row)
    try:
        yield
    finally:
        _CALL_CAPTIONS.reset(token)


def _token_captions(site: str, batch: int, positions: int) -> Tensor:
    """(batch * positions,) caption index of every token of the U-Net call in progress."""
    caption_of_row = _CALL_CAPTIONS.get()
    if caption_of_row is None or len(caption_of_row) != batch:
        raise RuntimeError(
            f"{site}: captions of the rows are only known while `sample` calls the U-Net; call "
            "`sample` inside the `with` block (or do not ask for captions)"
        )
    return caption_of_row.repeat_interleave(positions)


def resolve_unet_site(unet: nn.Module, site: str) -> nn.Module:
    """The ``Transformer2DModel`` named by ``site``; an unknown name lists the valid ones."""
    return resolve_site(unet, site).module


class UNetCallContext(CallContext):
    """Per U-Net call: each row's timestep (a forward pre-hook on the U-Net), its batch row and,
    inside ``sample``, the index of the caption it draws; ``describe`` gives them per token."""

    def __init__(self) -> None:
        self.timesteps = torch.zeros(0, dtype=torch.long)
        self.calls = -1  # index of the U-Net call in progress since ``attach``
        self._handle: RemovableHandle | None = None

    def attach(self, model: nn.Module) -> None:
        self.timesteps, self.calls = torch.zeros(0, dtype=torch.long), -1
        self._handle = model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _pre_hook(self, _: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).flatten().long().cpu()
        self.timesteps = t.expand(x.shape[0]) if t.numel() == 1 else t
        self.calls += 1

    def per_token(self, batch: int, positions: int) -> Tensor:
        """(batch * positions,) timestep of every token of the U-Net call in progress."""
        if len(self.timesteps) != batch:
            raise RuntimeError(
                "a site ran outside a U-Net call (or with another batch size): call the whole "
                "UNet2DConditionModel inside the hook's `with` block"
            )
        return self.timesteps.repeat_interleave(positions)

    def describe(self, site: Site, tensor: Tensor) -> dict[str, Tensor]:
        b, _, h, w = tensor.shape
        meta = {
            "timesteps": self.per_token(b, h * w),
            "rows": torch.arange(b).repeat_interleave(h * w),
            "call": torch.tensor(self.calls),
        }
        if _CALL_CAPTIONS.get() is not None:
            meta["captions"] = _token_captions(site.name, b, h * w)
        return meta


class UNetCapture(Capture):
    """Records delta = block(h) - h (or block(h) with ``value="output"``) at U-Net sites, as tokens.

    Every U-Net call inside ``with`` is recorded (``cap[site]``: one (B*H*W, C) tensor per call,
    on the CPU). Token order within a call is (row, y, x), row-major, as ``tokens_from`` makes it.
    Per site: ``tokens`` (N, C), ``timesteps`` (N,) the diffusion timestep of each token, ``rows``
    (N,) the batch row within its U-Net call (during guided sampling rows < n are the
    unconditional half), ``captions`` (N,) the index of the caption (of ``sample``) each token's
    row draws, -1 for the unconditional rows, ``calls`` (N,) the index of the U-Net call (the
    denoising step when sampling one batch), ``shape`` the (C, H, W) of the block's map.
    ``keep(site, t)`` (optional) filters whole calls by timestep, to save memory.
    """

    def __init__(
        self,
        unet: nn.Module,
        sites: Sequence[str],
        keep: Callable[[str, Tensor], bool] | None = None,
        value: SiteValue = "update",
    ) -> None:
        self.value = value
        self._shapes: dict[str, tuple[int, int, int]] = {}
        super().__init__(
            unet,
            sites,
            value=value,
            to="cpu",
            context=UNetCallContext(),
            keep=None if keep is None else (lambda site, _x, meta: keep(site, meta["timesteps"])),
            transform=self._as_tokens,
        )

    def _as_tokens(self, site: Site, x: Tensor) -> Tensor:
        self._shapes[site.name] = tuple(x.shape[1:])  # type: ignore[assignment]
        return tokens_from(x, "spatial").reshape(-1, x.shape[1])

    def _calls(self, site: str) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        chunks = self[site]
        if not chunks:
            raise RuntimeError(f"nothing captured at {site!r}: run the U-Net inside `with`")
        return chunks, self.meta[site]

    def tokens(self, site: str) -> Tensor:
        return torch.cat(self._calls(site)[0])

    def timesteps(self, site: str) -> Tensor:
        return torch.cat([m["timesteps"] for m in self._calls(site)[1]])

    def rows(self, site: str) -> Tensor:
        return torch.cat([m["rows"] for m in self._calls(site)[1]])

    def captions(self, site: str) -> Tensor:
        meta = self._calls(site)[1]
        if any("captions" not in m for m in meta):
            raise RuntimeError(f"{site}: some U-Net calls were not made by `sample`")
        return torch.cat([m["captions"] for m in meta])

    def calls(self, site: str) -> Tensor:
        chunks, meta = self._calls(site)
        return torch.cat([torch.full((len(x),), int(m["call"])) for x, m in zip(chunks, meta)])

    def shape(self, site: str) -> tuple[int, int, int]:
        """(C, H, W) of the block's feature map at ``site``."""
        self._calls(site)
        return self._shapes[site]


def capture_sites(
    unet: nn.Module,
    sites: Sequence[str],
    keep: Callable[[str, Tensor], bool] | None = None,
    value: SiteValue = "update",
) -> UNetCapture:
    """``with capture_sites(unet, [site]) as cap: sample(...)``, then ``cap.tokens(site)``."""
    return UNetCapture(unet, sites, keep, value)


@contextmanager
def replace_site(
    unet: nn.Module,
    site: str,
    fn: Callable[..., Tensor],
    value: SiteValue = "update",
    fn_device: str | torch.device | None = "cpu",
    per_caption: bool = False,
) -> Iterator[None]:
    """Inside ``with``, the block at ``site`` outputs h + fn(delta, t) instead of h + delta.

    ``fn`` gets the residual update as tokens (B*H*W, C) and each token's timestep (B*H*W,) and
    returns new tokens of the same shape (an SAE reconstruction, an edited code decoded). The
    output is written as y + (fn(delta) - delta) (``common.hooks.Site.write_output``), so the
    identity leaves it bit-for-bit unchanged. With ``value="output"`` fn gets and replaces the
    block output y itself: y -> fn(y, t).
    ``fn`` runs on ``fn_device`` in float32 (the CPU by default, where SAEs trained on captured
    tokens live; None: the U-Net's device and dtype), its result goes back to the U-Net's.
    ``per_caption``: fn(delta, t, captions) also gets the caption index (into ``sample``'s
    captions) of each token, -1 on the unconditional rows of guidance, to edit per caption.
    """
    context = UNetCallContext()

    def edit(a: Tensor) -> Tensor:
        b, c, hh, ww = a.shape
        delta = tokens_from(a, "spatial").reshape(-1, c)
        t = context.per_token(b, hh * ww)
        extra = (_token_captions(site, b, hh * ww),) if per_caption else ()
        if fn_device is None:
            new = fn(delta, t.to(delta.device), *(e.to(delta.device) for e in extra))
        else:
            x = delta.to(fn_device, torch.float32)
            new = fn(x, t.to(fn_device), *(e.to(fn_device) for e in extra))
        if not isinstance(new, Tensor) or new.shape != delta.shape:
            raise ValueError(
                f"replacement at {site} must return a tensor of shape {tuple(delta.shape)} "
                f"(tokens x channels), got {getattr(new, 'shape', type(new))}"
            )
        new = new.to(delta.device, delta.dtype).reshape(b, hh, ww, c).permute(0, 3, 1, 2)
        # An update is written as y + (new - delta) by the hook layer; an output as y + (new - y),
        # which keeps the block's memory layout (the next convolutions' numerics depend on it),
        # so that the identity leaves the image bit for bit in both cases.
        return new if value == "update" else a + (new - a)

    context.attach(unet)
    try:
        with replace(unet, site, edit, value=value):
            yield
    finally:
        context.detach()


__all__ = [
    "SITE_VALUES",
    "UNetCallContext",
    "UNetCapture",
    "capture_sites",
    "captions_of_rows",
    "list_unet_sites",
    "replace_site",
    "resolve_unet_site",
]
