"""Attention processors installed per UNet instance, each install returning an undo handle.

:func:`install_processors` sets processors on named attention layers of one UNet instance and
returns the :class:`ProcessorHandle` that puts the replaced ones back; every install in the
project (K/V copies here, RRA and the reference writers in :mod:`eqdiff.method.reference`) goes
through it. This module also holds the Custom-Diffusion part (docs/method.md §3): trainable
copies of the cross-attention K/V projections (initialised from the pretrained ones, the BOS
token's K/V detached) and the capture of the placeholder token's cross-attention maps for the
auxiliary mask loss (§6). Processors are ``nn.Module``s, so their tensors follow the UNet across
devices; their trainable tensors carry the ``eqdiff_kv.`` name prefix in concept files.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

KV_PREFIX = "eqdiff_kv."

KeyValue = tuple[nn.Linear, nn.Linear]
"""A layer's ``(to_k, to_v)`` projections."""


def float32_projections(unet: UNet2DConditionModel) -> dict[str, KeyValue]:
    """Float32 copies of every attention layer's K/V projections, by processor name.

    Taken before a trainer casts its frozen weights (bf16 on CUDA), so that the trainable
    copies made from them (:func:`trainable_copy`: Custom Diffusion's K/V, RRA's W'_k and
    W'_v) start from the pretrained weights as loaded, not from their rounding
    (docs/method.md §3, §5). On the UNet's device.
    """
    return {name: (copy.deepcopy(module.to_k).float(), copy.deepcopy(module.to_v).float())
            for name, module in attention_modules(unet).items()}


def trainable_copy(projection: nn.Linear) -> nn.Linear:
    """A float32 copy of ``projection`` that requires a gradient (the original is untouched)."""
    return copy.deepcopy(projection).float().requires_grad_(True)


class CrossAttentionCapture:
    """Collects the placeholder token's cross-attention maps during one UNet forward.

    Call :meth:`begin` with a (B, L) boolean mask of the placeholder's positions before the
    forward (rows without the token, e.g. prior samples, are all False), then read
    :meth:`maps_at` and :meth:`clear`.

    ``only_side``: when some cross-attention layer has the loss's grid (see
    :func:`cross_attention_sides`), pass that side: only layers with that grid then compute
    explicit probabilities, the others keep SDPA — :meth:`maps_at` averages exactly those
    layers anyway. None (the default, and small test models where no layer has the grid):
    every layer is captured.
    """

    def __init__(self, only_side: int | None = None) -> None:
        self.token_mask: torch.Tensor | None = None
        self._maps: list[torch.Tensor] = []
        self._only_length = None if only_side is None else only_side * only_side

    def begin(self, token_mask: torch.Tensor) -> None:
        self.token_mask = token_mask
        self._maps = []

    def clear(self) -> None:
        self.token_mask = None
        self._maps = []

    @property
    def active(self) -> bool:
        return self.token_mask is not None

    def wants(self, num_queries: int) -> bool:
        """Whether a layer with ``num_queries`` query positions should record its map now."""
        return self.active and self._only_length in (None, num_queries)

    def record(self, probs: torch.Tensor) -> None:
        """probs: (B, heads, N, L) attention probabilities of one cross-attention layer."""
        assert self.token_mask is not None
        mask = self.token_mask.to(probs.dtype)[:, None, None, :]
        self._maps.append((probs * mask).sum(dim=-1).mean(dim=1).float())  # (B, N)

    def maps_at(self, resolution: int) -> torch.Tensor:
        """(B, r, r) token maps averaged over heads and layers.

        Layers whose grid is r×r are averaged; when no layer has that grid (small test models),
        every layer's map is resized to r×r with area averaging first.
        """
        if not self._maps:
            raise RuntimeError("no cross-attention maps were captured in this forward")
        grids = [m.reshape(m.shape[0], 1, *(2 * [math.isqrt(m.shape[1])])) for m in self._maps]
        exact = [g for g in grids if g.shape[-1] == resolution]
        chosen = exact or [F.interpolate(g, size=(resolution, resolution), mode="area")
                           for g in grids]
        return torch.stack(chosen).mean(dim=0).squeeze(1)


class CustomKVProcessor(nn.Module):
    """Cross-attention with (optionally) trainable K/V copies and token-map capture.

    Numerically the same as diffusers' default processor when ``to_k``/``to_v`` equal the
    layer's own projections and nothing is captured.
    """

    def __init__(self, attn: Attention, *, train_kv: bool,
                 capture: CrossAttentionCapture | None, pretrained: KeyValue | None = None
                 ) -> None:
        super().__init__()
        self.train_kv = train_kv
        if train_kv:  # copied from ``pretrained`` (float32 as loaded) when given
            to_k, to_v = pretrained or (attn.to_k, attn.to_v)
            self.to_k, self.to_v = trainable_copy(to_k), trainable_copy(to_v)
        self.capture = capture

    def forward(self, attn: Attention, hidden_states: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                **_: object) -> torch.Tensor:
        if encoder_hidden_states is None:
            raise ValueError("CustomKVProcessor is for cross-attention layers only")
        residual = hidden_states
        batch, length, _ = hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query = attn.to_q(hidden_states)
        to_k, to_v = (self.to_k, self.to_v) if self.train_kv else (attn.to_k, attn.to_v)
        key = to_k(encoder_hidden_states)
        value = to_v(encoder_hidden_states)
        if self.train_kv:  # the BOS token's K/V get no gradient (Custom Diffusion)
            key = torch.cat([key[:, :1].detach(), key[:, 1:]], dim=1)
            value = torch.cat([value[:, :1].detach(), value[:, 1:]], dim=1)
        heads = attn.heads
        query, key, value = (t.reshape(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)
                             for t in (query, key, value))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        if self.capture is not None and self.capture.wants(length):
            scores = (query @ key.transpose(-1, -2)).float() * attn.scale
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            self.capture.record(probs)
            out = (probs.to(value.dtype) @ value)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, length, -1).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@dataclass
class ProcessorHandle:
    """Puts back the processors an install replaced (and only those)."""

    unet: UNet2DConditionModel
    originals: dict[str, object]
    installed: dict[str, object] = field(default_factory=dict)

    def remove(self) -> None:
        current = dict(self.unet.attn_processors)
        current.update(self.originals)
        self.unet.set_attn_processor(current)
        self.installed = {}


def cross_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """Processor names of the cross-attention layers (``…attn2.processor`` in SD-1.x)."""
    names = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    if not names:
        raise ValueError("this UNet has no cross-attention layers (attn2)")
    return names


def cross_attention_sides(unet: UNet2DConditionModel, latent_side: int) -> dict[str, int]:
    """Query-grid side of each cross-attention layer for square latents of ``latent_side``.

    Follows ``UNet2DConditionModel``'s layout: down block i runs at side ``s_i`` (each block but
    the last halves it, rounding up like its stride-2 convolution), the mid block at the
    smallest side, up block j at the side of down block ``n - 1 - j``. Returns
    {processor name: side}.
    """
    sides = [latent_side]
    for _ in range(len(unet.down_blocks) - 1):
        sides.append(-(-sides[-1] // 2))
    last = len(sides) - 1
    result = {}
    for name in cross_attention_names(unet):
        if name.startswith("mid_block."):
            result[name] = sides[last]
        else:
            kind, index = name.split(".")[:2]
            block = int(index)
            result[name] = sides[block] if kind == "down_blocks" else sides[last - block]
    return result


def attention_modules(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """This UNet's attention modules by processor name (``…attn1.processor``)."""
    return {f"{name}.processor": module for name, module in unet.named_modules()
            if isinstance(module, Attention)}


def install_processors(unet: UNet2DConditionModel, names: Iterable[str],
                       make: Callable[[str, Attention, object], object]) -> ProcessorHandle:
    """Give each attention layer in ``names`` of this UNet instance the processor
    ``make(name, module, current)`` returns (``current``: the processor it replaces), in the
    order of ``names``; the handle puts back the replaced processors, and only those.
    """
    modules = attention_modules(unet)
    current = dict(unet.attn_processors)
    names = list(names)
    unknown = sorted(set(names) - set(modules))
    if unknown:
        raise ValueError(f"this UNet has no attention layers {unknown[:3]}; was the concept "
                         "trained on another base model?")
    handle = ProcessorHandle(unet, {name: current[name] for name in names})
    for name in names:
        processor = make(name, modules[name], current[name])
        current[name] = processor
        handle.installed[name] = processor
    unet.set_attn_processor(current)
    return handle


def install_custom_kv(unet: UNet2DConditionModel, *, train_kv: bool,
                      capture: CrossAttentionCapture | None = None,
                      pretrained: Mapping[str, KeyValue] | None = None) -> ProcessorHandle:
    """Install :class:`CustomKVProcessor` on every cross-attention layer of this UNet; the
    K/V copies start from ``pretrained`` (:func:`float32_projections`) when given, else from
    the layers' own weights."""
    return install_processors(
        unet, cross_attention_names(unet),
        lambda name, module, _current: CustomKVProcessor(
            module, train_kv=train_kv, capture=capture,
            pretrained=None if pretrained is None else pretrained[name]))


def kv_learned_tensors(handle: ProcessorHandle) -> dict[str, torch.Tensor]:
    """The trained K/V weights by concept-file name (``eqdiff_kv.<layer>.to_k.weight``)."""
    tensors = {}
    for name, processor in handle.installed.items():
        if not getattr(processor, "train_kv", False):
            continue
        layer = name.removesuffix(".processor")
        for proj in ("to_k", "to_v"):
            for pname, tensor in getattr(processor, proj).named_parameters():
                tensors[f"{KV_PREFIX}{layer}.{proj}.{pname}"] = tensor.detach().clone()
    return tensors


def kv_parameters(handle: ProcessorHandle) -> list[nn.Parameter]:
    return [p for proc in handle.installed.values() if getattr(proc, "train_kv", False)
            for proj in (proc.to_k, proc.to_v) for p in proj.parameters()]


def load_kv_tensors(handle: ProcessorHandle, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy saved K/V weights into the processors of ``handle`` (names must match exactly)."""
    expected = kv_learned_tensors(handle).keys()
    given = {k for k in tensors if k.startswith(KV_PREFIX)}
    if given != set(expected):
        missing, extra = sorted(set(expected) - given)[:3], sorted(given - set(expected))[:3]
        raise ValueError(f"K/V tensors do not match this UNet: missing {missing}, "
                         f"unexpected {extra}")
    for name, processor in handle.installed.items():
        layer = name.removesuffix(".processor")
        for proj in ("to_k", "to_v"):
            for pname, param in getattr(processor, proj).named_parameters():
                with torch.no_grad():
                    param.copy_(tensors[f"{KV_PREFIX}{layer}.{proj}.{pname}"])


@dataclass
class WeightHandle:
    """Restores module weights that :func:`write_kv_weights` overwrote."""

    originals: dict[str, tuple[nn.Parameter, torch.Tensor]]

    def remove(self) -> None:
        with torch.no_grad():
            for param, saved in self.originals.values():
                param.copy_(saved)
        self.originals = {}


def write_kv_weights(unet: UNet2DConditionModel,
                     tensors: Mapping[str, torch.Tensor]) -> WeightHandle:
    """Write trained K/V weights straight into this UNet's cross-attention projections.

    At inference a Custom-Diffusion K/V copy is just a replacement weight, so a concept
    loads into a plain diffusers pipeline without custom processors. The returned handle
    restores the pretrained weights (used when a generator switches concepts).
    """
    params = dict(unet.named_parameters())
    originals: dict[str, tuple[nn.Parameter, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(KV_PREFIX):
            continue
        target = key.removeprefix(KV_PREFIX)
        if target not in params:
            raise ValueError(f"concept tensor {key!r} has no matching UNet parameter "
                             f"{target!r}; was it trained on another base model?")
        param = params[target]
        if param.shape != value.shape:
            raise ValueError(f"{key}: shape {tuple(value.shape)} does not match the UNet's "
                             f"{tuple(param.shape)}")
        originals[target] = (param, param.detach().clone())
    with torch.no_grad():
        for key, value in tensors.items():
            if key.startswith(KV_PREFIX):
                originals[key.removeprefix(KV_PREFIX)][0].copy_(value)
    return WeightHandle(originals)
