"""The extension seam of the trainer: everything a method adds to the UNet is a
:class:`TrainingExtension`, and the trainer runs a list of them.

The trainer builds the extensions of Custom Diffusion's cross-attention from the method itself
(:func:`builtin_extensions`): the mask loss on the placeholder's cross-attention maps
(:class:`CrossAttentionLossExtension`, ``method.xattn_loss``) and the trainable K/V copies
(:class:`CustomKVExtension`, ``method.train_kv``). The caller passes the others — RRA,
:class:`eqdiff.method.reference.RRAExtension` — and :func:`check_extensions` refuses a method
whose switches no extension provides.

The trainer keeps the list in one order — its own extensions, then the caller's, then its
adapters (:func:`adapter_extensions`: the UNet LoRA of ``method.unet_lora``,
:class:`~eqdiff.method.lora.UNetLoRAExtension`), which wrap the UNet's projection layers and so
come after everything that copies them (the K/V copies, RRA's processors and reference UNet) —
and uses it for everything in that order: installing, drawing, the passes before the UNet, loss
terms and learned tensors; the optimizer gets the placeholder vectors, then each extension's
parameters. The order is part of a run's identity (the same draws, the same parameter order,
the same checkpoint), so it never changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

from eqdiff.config import LossConfig, MethodConfig
from eqdiff.method.attention import (
    CrossAttentionCapture,
    ProcessorHandle,
    cross_attention_sides,
    install_custom_kv,
    kv_learned_tensors,
    kv_parameters,
    load_kv_tensors,
)
from eqdiff.method.losses import cross_attention_mask_loss

if TYPE_CHECKING:
    from eqdiff.method.training.batch import ConceptData, StepBatch
    from eqdiff.method.training.trainer import ConceptTrainer

# method switches that an extension implements, with what they turn on (for errors)
EXTENSION_SWITCHES = {"train_kv": "Custom-Diffusion K/V copies",
                      "xattn_loss": "the cross-attention mask loss",
                      "rra": "residual reference attention",
                      "rra_loss": "the RRA attention loss",
                      "unet_lora": "the UNet LoRA"}


class TrainingExtension(Protocol):
    """A UNet extension trained with the concept (RRA, the K/V copies, the mask loss).

    ``install`` runs once the trainer has loaded the model onto its device and encoded the
    data (``trainer.instance_latents``, ``trainer.pixel_masks``, …), in list order; ``remove``
    undoes it when the run ends, in reverse order (also after a failed set-up: it must accept
    being called before or without ``install``).
    """

    provides: frozenset[str]
    """The method switches (:class:`~eqdiff.config.MethodConfig` fields, keys of
    :data:`EXTENSION_SWITCHES`) this extension implements in this run."""

    def install(self, trainer: ConceptTrainer, data: ConceptData) -> None: ...

    def remove(self) -> None: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def networks(self) -> list[nn.Module]:
        """Frozen networks the extension runs every step (compiled with the UNet under
        ``train.compile``)."""
        ...

    def draw(self, step: int, instance_indices: Tensor) -> dict[str, Tensor]:
        """This step's random choices as CPU tensors of fixed shapes (keys start with the
        extension's concept-file prefix); they reach :meth:`before_unet` on the device as
        ``batch.draws``. The device half of a step must not draw or copy from the host itself
        (it may be a CUDA graph)."""
        ...

    def before_unet(self, batch: StepBatch) -> None: ...

    def loss_terms(self, batch: StepBatch) -> dict[str, Tensor]: ...

    def after_step(self) -> None: ...

    def learned_tensors(self) -> dict[str, Tensor]: ...

    def load_learned_tensors(self, tensors: dict[str, Tensor]) -> None: ...


class WeightsOnlyExtension:
    """The step hooks of an extension that only adds trained weights to the UNet (K/V copies,
    a LoRA): no networks of its own, no draws, nothing before the UNet, no loss terms."""

    def networks(self) -> list[nn.Module]:
        return []

    def draw(self, step: int, instance_indices: Tensor) -> dict[str, Tensor]:
        return {}

    def before_unet(self, batch: StepBatch) -> None:
        pass

    def loss_terms(self, batch: StepBatch) -> dict[str, Tensor]:
        return {}

    def after_step(self) -> None:
        pass


class CrossAttentionLossExtension:
    """The cross-attention mask loss ``"xattn"`` (docs/method.md §6): the placeholder's
    cross-attention maps at ``resolution`` against the instance rows' masks.

    It owns the :class:`~eqdiff.method.attention.CrossAttentionCapture`; the processors that
    record into it are :class:`CustomKVExtension`'s, so it is installed before that one.
    Only layers with the loss's grid record, when the UNet has any (every layer otherwise).
    """

    provides = frozenset({"xattn_loss"})

    def __init__(self, resolution: int) -> None:
        self.resolution = resolution
        self.capture: CrossAttentionCapture | None = None
        self.token_rows = torch.empty(0, dtype=torch.bool)  # (Bi + Bp, L): placeholder places
        self.masks = torch.empty(0)  # (N, 1, H, W) pixel masks of the instance images

    def install(self, trainer: ConceptTrainer, data: ConceptData) -> None:
        """Make the capture, and the fixed placeholder positions of every row."""
        components = trainer.components
        latent_side = components.latent_size(data.images.shape[-1])
        sides = cross_attention_sides(components.unet, latent_side).values()
        self.capture = CrossAttentionCapture(self.resolution if self.resolution in sides
                                             else None)
        ids = trainer.instance_ids
        bi = trainer.train.instance_batch
        self.token_rows = torch.zeros(bi + trainer.prior_batch, ids.shape[1], dtype=torch.bool,
                                      device=ids.device)
        self.token_rows[:bi] = ids.expand(bi, -1) == trainer.token_id
        self.masks = trainer.pixel_masks

    def remove(self) -> None:
        self.capture = None

    def parameters(self) -> list[nn.Parameter]:
        return []

    def networks(self) -> list[nn.Module]:
        return []

    def draw(self, step: int, instance_indices: Tensor) -> dict[str, Tensor]:
        return {}

    def before_unet(self, batch: StepBatch) -> None:
        assert self.capture is not None, "install() first"
        self.capture.begin(self.token_rows)

    def loss_terms(self, batch: StepBatch) -> dict[str, Tensor]:
        assert self.capture is not None, "install() first"
        maps = self.capture.maps_at(self.resolution)[:batch.instance_count]
        loss = cross_attention_mask_loss(maps, self.masks[batch.instance_indices],
                                         self.resolution)
        self.capture.clear()  # the maps are read: no further recording this step
        return {"xattn": loss}

    def after_step(self) -> None:
        pass

    def learned_tensors(self) -> dict[str, Tensor]:
        return {}

    def load_learned_tensors(self, tensors: dict[str, Tensor]) -> None:
        pass


class CustomKVExtension(WeightsOnlyExtension):
    """Custom Diffusion's cross-attention processors (docs/method.md §3) on every
    cross-attention layer of the trained UNet: trainable K/V copies when ``train_kv``
    (``eqdiff_kv.`` tensors), and recording into ``loss``'s capture when given.

    One processor per layer serves both (it attends with the K/V copies and, when capturing,
    computes explicit probabilities), so ``loss`` must be installed first.
    """

    def __init__(self, *, train_kv: bool, loss: CrossAttentionLossExtension | None) -> None:
        self.train_kv = train_kv
        self.loss = loss
        self.provides = frozenset({"train_kv"} if train_kv else ())
        self.handle: ProcessorHandle | None = None

    def install(self, trainer: ConceptTrainer, data: ConceptData) -> None:
        capture = None
        if self.loss is not None:
            if self.loss.capture is None:
                raise RuntimeError("install the cross-attention loss before the K/V processors")
            capture = self.loss.capture
        self.handle = install_custom_kv(trainer.components.unet, train_kv=self.train_kv,
                                        capture=capture,
                                        pretrained=trainer.pretrained_projections)

    def remove(self) -> None:
        """Put back the processors the K/V copies replaced."""
        if self.handle is not None:
            self.handle.remove()
        self.handle = None

    def parameters(self) -> list[nn.Parameter]:
        assert self.handle is not None, "install() first"
        return kv_parameters(self.handle)

    def learned_tensors(self) -> dict[str, Tensor]:
        assert self.handle is not None, "install() first"
        return kv_learned_tensors(self.handle)

    def load_learned_tensors(self, tensors: dict[str, Tensor]) -> None:
        assert self.handle is not None, "install() first"
        if self.train_kv:
            load_kv_tensors(self.handle, tensors)


def builtin_extensions(method: MethodConfig, losses: LossConfig) -> list[TrainingExtension]:
    """The extensions the trainer builds from ``method`` itself, in their fixed order: the
    mask loss, then the cross-attention processors (which record for it)."""
    loss = (CrossAttentionLossExtension(losses.xattn_resolution) if method.xattn_loss
            else None)
    extensions: list[TrainingExtension] = [] if loss is None else [loss]
    if method.train_kv or loss is not None:
        extensions.append(CustomKVExtension(train_kv=method.train_kv, loss=loss))
    return extensions


def adapter_extensions(method: MethodConfig) -> list[TrainingExtension]:
    """The trainer's extensions that wrap the UNet's own layers, last in the list (after the
    caller's): the UNet LoRA when ``method.unet_lora``."""
    if not method.unet_lora:
        return []
    from eqdiff.method.lora import UNetLoRAExtension  # lora builds on this module

    return [UNetLoRAExtension(method.recipe.lora_rank)]


def check_extensions(method: MethodConfig, extensions: list[TrainingExtension]) -> None:
    """Refuse ``method`` when a switch it turns on has no extension in ``extensions`` that
    provides it (e.g. RRA without :class:`~eqdiff.method.reference.RRAExtension`)."""
    provided = frozenset().union(*(extension.provides for extension in extensions))
    for switch, description in EXTENSION_SWITCHES.items():
        if getattr(method, switch) and switch not in provided:
            raise ValueError(f"method {method.name!r} enables {description}; pass the extension "
                             f"that provides {switch!r} (or use a method with {switch}=False)")
