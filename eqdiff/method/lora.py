"""The UNet LoRA of the DreamBooth-LoRA baseline (docs/method.md §8), through peft.

The recipe is that of diffusers' ``train_dreambooth_lora.py``: a LoRA of rank r with
``lora_alpha = r`` (scale 1) and Gaussian initialisation (A random, B = 0, so a fresh adapter
changes nothing) on the query, key, value and output projections of every attention layer of
the UNet. It is injected into *one* UNet instance with diffusers' own peft integration
(``add_adapter`` in training, ``load_lora_adapter`` for a concept) under the adapter name
:data:`ADAPTER_NAME`, and every install returns a :class:`LoraHandle` that takes it out again.

The projections are targeted by their full module names, so the attention processors' own
copies of projections (Custom-Diffusion K/V, RRA) are never wrapped; the processors call the
layer's projections, which the LoRA wraps. Install the LoRA after those processors (the trainer
does): a processor copies the layer's projections when it is made, and RRA's reference UNet is
a copy of the UNet.

Concept-file names are ``eqdiff_lora.<module>.lora_A.weight`` and ``….lora_B.weight``, with
``<module>`` the projection's path in the UNet
(``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``); the same tensor is
``unet.<module>.lora_A.weight`` in a diffusers LoRA state dict (peft layout):
:func:`diffusers_lora_state_dict` swaps the prefix, and nothing else. Trained LoRA matrices are
float32 whatever dtype the frozen UNet is held in (training runs under autocast), and A is drawn
from a generator seeded by the run's seed, so a run is reproducible.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_base import LORA_WEIGHT_NAME_SAFE
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from eqdiff.method.attention import attention_modules
from eqdiff.method.training.extensions import WeightsOnlyExtension

if TYPE_CHECKING:
    from eqdiff.method.training import ConceptData, ConceptTrainer

logger = logging.getLogger(__name__)

LORA_PREFIX = "eqdiff_lora."
DIFFUSERS_UNET_PREFIX = "unet."  # the UNet's part of a diffusers pipeline LoRA state dict
ADAPTER_NAME = "eqdiff"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
_UNSET = object()


def projection_names(unet: UNet2DConditionModel) -> list[str]:
    """Module names of the LoRA's targets: the four projections of every attention layer."""
    return [f"{name.removesuffix('.processor')}.{projection}"
            for name in attention_modules(unet) for projection in PROJECTIONS]


@dataclass
class LoraHandle:
    """Takes this install's adapter out of the UNet again.

    When it was the UNet's only adapter, the peft layers are unwrapped (every projection is its
    original ``nn.Linear`` again) and the UNet's peft bookkeeping is put back as it was;
    otherwise only this adapter is deleted and the others stay.
    """

    unet: UNet2DConditionModel | None
    adapter_name: str
    peft_flag: object  # the UNet instance's own ``_hf_peft_config_loaded`` before the install

    def remove(self) -> None:
        unet = self.unet
        if unet is None:
            return
        if set(getattr(unet, "peft_config", {})) - {self.adapter_name}:
            unet.delete_adapters(self.adapter_name)
        else:
            unet.unload_lora()
            vars(unet).pop("_hf_peft_config_loaded", None)
            if self.peft_flag is not _UNSET:
                unet._hf_peft_config_loaded = self.peft_flag
        self.unet = None


def _inject(unet: UNet2DConditionModel, inject: Callable[[], None]) -> LoraHandle:
    """Run ``inject`` (a peft install of :data:`ADAPTER_NAME` into ``unet``) and keep every
    other parameter's ``requires_grad`` as it was: peft marks everything but its adapters
    frozen, processors' trainable copies included."""
    if ADAPTER_NAME in getattr(unet, "peft_config", {}):
        raise ValueError(f"this UNet already holds a LoRA adapter {ADAPTER_NAME!r} (a concept "
                         "applied and not removed?); remove it first")
    trainable = [(param, param.requires_grad) for param in unet.parameters()]
    handle = LoraHandle(unet, ADAPTER_NAME, vars(unet).get("_hf_peft_config_loaded", _UNSET))
    try:
        inject()
    except Exception:
        if ADAPTER_NAME in getattr(unet, "peft_config", {}):
            handle.remove()
        raise
    finally:
        for param, flag in trainable:
            param.requires_grad_(flag)
    return handle


def install_unet_lora(unet: UNet2DConditionModel, rank: int,
                      generator: torch.Generator) -> LoraHandle:
    """A fresh trainable LoRA of ``rank`` on this UNet instance (see the module docstring):
    B zero, A drawn from N(0, 1/rank²) like peft's Gaussian init but from ``generator`` (a CPU
    generator; peft's own draw comes from the global RNG), both float32 and requiring a
    gradient."""
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=projection_names(unet))
    handle = _inject(unet, lambda: unet.add_adapter(config, adapter_name=ADAPTER_NAME))
    for layer in unet.modules():  # peft made them in the dtype of the (frozen) projection
        if isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A:
            layer.lora_A[ADAPTER_NAME].float().requires_grad_(True)
            layer.lora_B[ADAPTER_NAME].float().requires_grad_(True)
    with torch.no_grad():
        for name, param in lora_parameters(handle).items():
            if name.endswith(".lora_A.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) / rank)
    return handle


def lora_init_generator(seed: int) -> torch.Generator:
    """The CPU generator a run's LoRA is initialised from: seeded from sha256 of
    ``unet-lora/{seed}``, apart from the run's step draws."""
    digest = hashlib.sha256(f"unet-lora/{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def lora_parameters(handle: LoraHandle) -> dict[str, nn.Parameter]:
    """The adapter's A and B matrices by concept-file name, in the UNet's module order."""
    assert handle.unet is not None, "the LoRA was removed"
    marker = f".{handle.adapter_name}."
    return {LORA_PREFIX + name.replace(marker, "."): param
            for name, param in handle.unet.named_parameters()
            if f".lora_A{marker}" in name or f".lora_B{marker}" in name}


def lora_learned_tensors(handle: LoraHandle) -> dict[str, Tensor]:
    """Copies of the adapter's matrices by concept-file name
    (``eqdiff_lora.<module>.lora_A.weight``, …)."""
    return {name: param.detach().clone() for name, param in lora_parameters(handle).items()}


def load_lora_tensors(handle: LoraHandle, tensors: Mapping[str, Tensor]) -> None:
    """Copy saved LoRA matrices into the adapter of ``handle`` (names and shapes must match)."""
    params = lora_parameters(handle)
    given = {name for name in tensors if name.startswith(LORA_PREFIX)}
    if given != params.keys():
        missing, extra = sorted(params.keys() - given)[:3], sorted(given - params.keys())[:3]
        raise ValueError(f"LoRA tensors do not match this UNet's adapter: missing {missing}, "
                         f"unexpected {extra}")
    for name, param in params.items():
        if tensors[name].shape != param.shape:
            raise ValueError(f"{name}: shape {tuple(tensors[name].shape)} does not match the "
                             f"adapter's {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])


def diffusers_lora_state_dict(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA tensors of ``tensors`` (a concept's, any other names are left out) under their
    names in a diffusers pipeline LoRA state dict: ``unet.<module>.lora_A.weight``."""
    return {DIFFUSERS_UNET_PREFIX + name.removeprefix(LORA_PREFIX): tensor
            for name, tensor in tensors.items() if name.startswith(LORA_PREFIX)}


def apply_unet_lora(unet: UNet2DConditionModel,
                    tensors: Mapping[str, Tensor]) -> LoraHandle | None:
    """Load the LoRA tensors of a concept into this UNet instance for generation, with
    diffusers' ``load_lora_adapter`` (frozen, in the UNet's dtype); None when ``tensors`` has
    none. Write any other weights into the projections first: the LoRA wraps them."""
    state_dict = diffusers_lora_state_dict(tensors)
    if not state_dict:
        return None
    handle = _inject(unet, lambda: unet.load_lora_adapter(
        state_dict, prefix=DIFFUSERS_UNET_PREFIX.rstrip("."), adapter_name=ADAPTER_NAME))
    for param in lora_parameters(handle).values():
        param.requires_grad_(False)
    return handle


def write_diffusers_lora(tensors: Mapping[str, Tensor], folder: str | Path) -> Path:
    """Write the UNet LoRA of a concept's ``tensors`` as diffusers' own LoRA file and return
    its path, ``folder/pytorch_lora_weights.safetensors``.

    The file is what ``train_dreambooth_lora.py`` saves (``StableDiffusionPipeline.
    save_lora_weights``, keys ``unet.<module>.lora.down.weight`` / ``lora.up.weight``, float32,
    no alphas: scale 1), so a plain ``StableDiffusionPipeline.load_lora_weights(folder)`` loads
    it. Only the LoRA is in it: the concept's token (for DreamBooth-LoRA the initializer word's
    embedding, untrained) is not. Raises ``ValueError`` when ``tensors`` holds no LoRA.
    """
    state_dict = diffusers_lora_state_dict(tensors)
    if not state_dict:
        raise ValueError(f"these tensors hold no UNet LoRA ({LORA_PREFIX}*): nothing to write")
    unet_layers = {name.removeprefix(DIFFUSERS_UNET_PREFIX):
                   tensor.detach().float().cpu().contiguous()
                   for name, tensor in state_dict.items()}
    folder = Path(folder)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(unet_layers),
        safe_serialization=True)
    return folder / LORA_WEIGHT_NAME_SAFE


class UNetLoRAExtension(WeightsOnlyExtension):
    """The UNet LoRA for :func:`eqdiff.method.training.train_concept` (the
    ``TrainingExtension`` seam): provides the method switch ``unet_lora``. Its trainable
    tensors are the adapter's A and B matrices (``eqdiff_lora.`` tensors); the trainer installs
    it after every other extension (see the module docstring)."""

    provides = frozenset({"unet_lora"})

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.handle: LoraHandle | None = None

    def install(self, trainer: ConceptTrainer, data: ConceptData) -> None:
        self.handle = install_unet_lora(trainer.components.unet, self.rank,
                                        lora_init_generator(trainer.config.train.seed))
        logger.info("UNet LoRA of rank %d on %d projections", self.rank,
                    len(lora_parameters(self.handle)) // 2)

    def remove(self) -> None:
        """Take the adapter out: the UNet's projections are plain layers again."""
        if self.handle is not None:
            self.handle.remove()
        self.handle = None

    def parameters(self) -> list[nn.Parameter]:
        assert self.handle is not None, "install() first"
        return list(lora_parameters(self.handle).values())

    def learned_tensors(self) -> dict[str, Tensor]:
        assert self.handle is not None, "install() first"
        return lora_learned_tensors(self.handle)

    def load_learned_tensors(self, tensors: dict[str, Tensor]) -> None:
        assert self.handle is not None, "install() first"
        load_lora_tensors(self.handle, tensors)
