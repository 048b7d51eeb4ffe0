"""Residual reference attention, RRA (docs/method.md §5, loss §6).

Three pieces, each an explicit object with a lifecycle — no globals, nothing stuck onto
library modules:

- :class:`ReferenceBank` — the self-attention inputs (norm1 outputs) of a frozen reference
  UNet, keyed by processor name. The reference pass fills it, the main pass reads it, its
  owner clears it after every step (training: ``after_step``; sampling: every denoising step).
- :class:`ReferenceWriter` — the processor installed on the reference UNet's self-attention
  layers of the configured blocks: it writes its input into the bank, then attends as before.
- :class:`RRAProcessor` — the processor installed on the *trained* UNet's same layers:
  frozen self-attention plus a reference branch with trainable K/V (initialised from the
  layer's own) and a zero-initialised output projection producing the residual and a gate.

:class:`RRAExtension` plugs all of it into :func:`eqdiff.method.training.train_concept` (a
:class:`~eqdiff.method.training.TrainingExtension` providing the method switches ``rra`` and
``rra_loss``). RRA tensors carry the ``eqdiff_rra.`` prefix in concept files
(``eqdiff_rra.<layer>.to_k.weight``, …).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from eqdiff.config import GateGradient, MethodConfig, RRABlock, RRAConfig, RRALossForm
from eqdiff.method.attention import (
    KeyValue,
    ProcessorHandle,
    cross_attention_sides,
    install_processors,
    trainable_copy,
)
from eqdiff.method.frequency import Band
from eqdiff.method.losses import pooled_rra_attention_loss, rra_attention_loss

if TYPE_CHECKING:
    from eqdiff.method.training import ConceptData, ConceptTrainer, StepBatch

logger = logging.getLogger(__name__)

RRA_PREFIX = "eqdiff_rra."
BLOCK_PREFIXES: dict[str, str] = {"down": "down_blocks.", "mid": "mid_block.",
                                  "up": "up_blocks."}
SELF_ATTENTION_SUFFIX = "attn1.processor"
REFERENCE_ROWS = f"{RRA_PREFIX}reference_rows"  # the step draw: each row's reference photo
# The RRA loss reads the reference attention of the up-block layers whose query grid side is
# this ("released" form; SD-1.x at 512 px: up_blocks.1, three layers), or of every layer whose
# side is at most this ("per-layer": the 8×8 mid block too) — cheap to hold as explicit
# probabilities; 32×32 and 64×64 maps would cost up to GBs per step.
DEFAULT_LOSS_RESOLUTION = 16
# SDPA backends for the RRA branch: not cuDNN's, whose backward failed on these layers on an
# H100 (torch 2.11: "mha_graph.execute ... is_good()" under CUDA_LAUNCH_BLOCKING, an illegal
# memory access without it); flash and memory-efficient attention train them correctly
RRA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


class BankSlot:
    """One layer's entry in a :class:`ReferenceBank`: its writer puts, its reader gets.

    Processors hold their layer's slot instead of looking their name up in the bank, so that
    under ``torch.compile`` (:mod:`eqdiff.method.compilation`) layers of the same shape share one
    compiled graph instead of specialising on their name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tensor: Tensor | None = None

    def put(self, hidden_states: Tensor) -> None:
        if self.tensor is not None:
            raise RuntimeError(f"reference bank already holds {self.name!r}: clear it after "
                               "each step")
        self.tensor = hidden_states

    def get(self) -> Tensor:
        if self.tensor is None:
            raise RuntimeError(f"reference bank has no entry for {self.name!r}; run the "
                               "reference pass before the main UNet, on the same layers")
        return self.tensor


class ReferenceBank:
    """Reference self-attention inputs by processor name, for one step.

    Entries are ``(Br, N, C)`` tensors (the reference UNet's norm1 output at that layer). ``Br``
    is the reference batch: equal to the main batch in training (one reference per row), 1 at
    inference (one reference for every image and both CFG branches; readers broadcast it).
    Each layer's entry lives in its :class:`BankSlot`, shared by that layer's writer and reader.
    """

    def __init__(self) -> None:
        self._slots: dict[str, BankSlot] = {}

    def slot(self, name: str) -> BankSlot:
        """The slot of layer ``name`` (made at its first request)."""
        if name not in self._slots:
            self._slots[name] = BankSlot(name)
        return self._slots[name]

    def write(self, name: str, hidden_states: Tensor) -> None:
        self.slot(name).put(hidden_states)

    def read(self, name: str) -> Tensor:
        return self.slot(name).get()

    def clear(self) -> None:
        for slot in self._slots.values():
            slot.tensor = None

    def __len__(self) -> int:
        return sum(slot.tensor is not None for slot in self._slots.values())

    def names(self) -> list[str]:
        """Names of the layers that hold an entry now."""
        return sorted(name for name, slot in self._slots.items() if slot.tensor is not None)


class ReferenceAttentionCapture:
    """RRA attention probabilities of one main-UNet forward, for the RRA loss (§6).

    Layers given this capture whose query grid side is in [``min_side``, ``max_side``] record
    explicit probabilities while the capture is active (between :meth:`begin` and
    :meth:`clear`); the others keep SDPA.
    """

    def __init__(self, max_side: int = DEFAULT_LOSS_RESOLUTION, min_side: int = 1) -> None:
        self.max_side, self.min_side = max_side, min_side
        self.active = False
        self._probs: list[Tensor] = []

    def begin(self) -> None:
        self.active = True
        self._probs = []

    def wants(self, num_queries: int) -> bool:
        return self.active and self.min_side <= math.isqrt(num_queries) <= self.max_side

    def record(self, probs: Tensor) -> None:
        """probs: (B, heads, Nq, Nk) softmax probabilities of one layer's reference branch."""
        self._probs.append(probs)

    def probabilities(self) -> list[Tensor]:
        """Each recording layer's probabilities, in the order the layers ran."""
        return list(self._probs)

    def clear(self) -> None:
        self.active = False
        self._probs = []


class ReferenceWriter:
    """Reference-UNet processor: writes its input into the bank, then runs ``inner`` unchanged."""

    def __init__(self, name: str, bank: ReferenceBank, inner: object) -> None:
        self.name, self.slot, self.inner = name, bank.slot(name), inner

    def __call__(self, attn: Attention, hidden_states: Tensor,
                 encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None,
                 **kwargs: object) -> Tensor:
        self.slot.put(hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                          **kwargs)


def unit_clamp(gate: Tensor) -> Tensor:
    """``clamp(gate, 0, 1)`` whose gradient is 1 on the closed interval [0, 1].

    torch's clamp has zero gradient *at* the bounds, and the RRA gate starts at exactly 0
    (zero-initialised projection), so with it the gate and the residual branch would never
    receive a gradient. Values are identical to ``clamp``.
    """
    inside = (gate >= 0) & (gate <= 1)
    return torch.where(inside, gate, gate.detach().clamp(0, 1))


def straight_through_unit_clamp(gate: Tensor) -> Tensor:
    """``clamp(gate, 0, 1)`` whose gradient is 1 everywhere (a straight-through estimator).

    Outside [0, 1] :func:`unit_clamp` passes no gradient, so a layer whose gate an update
    pushes outside at every position stops learning for good; here the gate keeps its
    gradient and can come back. Values are identical to ``clamp`` (``gate - gate.detach()``
    is exactly 0).
    """
    return gate.detach().clamp(0, 1) + (gate - gate.detach())


GATE_CLAMPS = {"inside": unit_clamp, "straight-through": straight_through_unit_clamp}
"""The gate's clamp for each ``rra.gate_gradient``."""


def _heads(tensor: Tensor, heads: int) -> Tensor:
    """(B, N, heads·d) → (B, heads, N, d)."""
    return tensor.reshape(tensor.shape[0], -1, heads, tensor.shape[-1] // heads).transpose(1, 2)


def _merge_heads(tensor: Tensor) -> Tensor:
    """(B, heads, N, d) → (B, N, heads·d)."""
    batch, heads, length, dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch, length, heads * dim)


def _broadcast_rows(tensor: Tensor, batch: int, name: str) -> Tensor:
    """Expand a reference batch of 1 to ``batch`` rows (a view, no copy)."""
    if tensor.shape[0] == batch:
        return tensor
    if tensor.shape[0] == 1:
        return tensor.expand(batch, *tensor.shape[1:])
    raise ValueError(f"{name}: the reference batch ({tensor.shape[0]}) must be 1 or the main "
                     f"batch ({batch})")


class RRAProcessor(nn.Module):
    """Self-attention with a residual reference branch (docs/method.md §5), per layer.

    With ``h`` the layer input (B, N, C) and ``r`` the bank entry (Br, Nr, C)::

        A_self = MHA(W_q h, W_k h, W_v h)          O_self = W_o A_self   (frozen)
        A_ref  = MHA(W_q h, W'_k r, W'_v r)        (W'_k, W'_v trainable, init W_k, W_v)
        [O_ref | m] = W'_o [A_ref ; A_self] + b'_o  (W'_o: 2·inner → C + 1, zero init)
        out = (1 - clamp(m, 0, 1)) · O_self + clamp(m, 0, 1) · O_ref

    With the zero initialisation ``m = 0`` and ``O_ref = 0``, so the output equals the plain
    layer's exactly. The clamp's gradient is ``gate_gradient``'s (:data:`GATE_CLAMPS`): on
    [0, 1] inclusive (:func:`unit_clamp`) or everywhere (:func:`straight_through_unit_clamp`).
    W'_k, W'_v are copied from ``pretrained`` (float32 as loaded) when given, else from the
    layer's own. Trainable tensors are float32 (training runs under autocast); cast the module
    to the UNet's dtype for inference without autocast.
    """

    def __init__(self, attn: Attention, name: str, bank: ReferenceBank,
                 capture: ReferenceAttentionCapture | None = None, *,
                 pretrained: KeyValue | None = None,
                 gate_gradient: GateGradient = "straight-through") -> None:
        super().__init__()
        self.name, self.slot, self.capture = name, bank.slot(name), capture
        self.gate_clamp = GATE_CLAMPS[gate_gradient]
        to_k, to_v = pretrained or (attn.to_k, attn.to_v)
        self.to_k, self.to_v = trainable_copy(to_k), trainable_copy(to_v)
        inner, channels = attn.to_v.out_features, attn.to_out[0].out_features
        self.to_out = nn.Linear(2 * inner, channels + 1, device=attn.to_q.weight.device)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, attn: Attention, hidden_states: Tensor,
                encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, temb: Tensor | None = None,
                **_: object) -> Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError(f"{self.name}: RRA is for plain self-attention (no encoder states, "
                             "no attention mask)")
        batch, length, _ = hidden_states.shape
        heads = attn.heads
        query = _heads(attn.to_q(hidden_states), heads)
        key = _heads(attn.to_k(hidden_states), heads)
        value = _heads(attn.to_v(hidden_states), heads)
        with sdpa_kernel(RRA_SDPA_BACKENDS):
            a_self = _merge_heads(F.scaled_dot_product_attention(query, key, value)
                                  ).to(query.dtype)
        o_self = attn.to_out[1](attn.to_out[0](a_self))

        reference = self.slot.get()  # projected before broadcasting: Br rows of work
        ref_key = _broadcast_rows(_heads(self.to_k(reference), heads), batch, self.name)
        ref_value = _broadcast_rows(_heads(self.to_v(reference), heads), batch, self.name)
        if self.capture is not None and self.capture.wants(length):
            scores = (query @ ref_key.transpose(-1, -2).to(query.dtype)).float() * attn.scale
            probs = scores.softmax(dim=-1)
            self.capture.record(probs)
            a_ref = probs.to(ref_value.dtype) @ ref_value
        else:
            with sdpa_kernel(RRA_SDPA_BACKENDS):
                a_ref = F.scaled_dot_product_attention(query, ref_key.to(query.dtype),
                                                       ref_value.to(query.dtype))
        mixed = self.to_out(torch.cat([_merge_heads(a_ref).to(a_self.dtype), a_self], dim=-1))
        o_ref, gate = mixed[..., :-1], self.gate_clamp(mixed[..., -1:])
        return (1 - gate) * o_self + gate * o_ref


def rra_layer_names(unet: UNet2DConditionModel, blocks: Iterable[RRABlock]) -> list[str]:
    """Processor names of the self-attention layers in ``blocks`` (SD-1.x mid + up: 10)."""
    prefixes = tuple(BLOCK_PREFIXES[block] for block in blocks)
    names = [name for name in unet.attn_processors
             if name.endswith(SELF_ATTENTION_SUFFIX) and name.startswith(prefixes)]
    if not names:
        raise ValueError(f"this UNet has no self-attention layers in blocks {tuple(blocks)}")
    return names


def _check_plain_self_attention(name: str, attn: Attention) -> None:
    if (attn.spatial_norm is not None or attn.group_norm is not None or attn.norm_q is not None
            or attn.residual_connection or attn.rescale_output_factor != 1.0):
        raise ValueError(f"{name}: RRA supports plain SD-1.x self-attention only (no spatial/"
                         "group/QK norm, no residual connection, no output rescaling)")


def install_reference_writers(unet: UNet2DConditionModel, bank: ReferenceBank,
                              names: Iterable[str]) -> ProcessorHandle:
    """Install :class:`ReferenceWriter` on layers ``names`` of the reference UNet."""
    return install_processors(unet, names,
                              lambda name, _module, current: ReferenceWriter(name, bank, current))


def install_rra(unet: UNet2DConditionModel, bank: ReferenceBank, names: Iterable[str], *,
                capture: ReferenceAttentionCapture | None = None,
                capture_names: Iterable[str] | None = None,
                pretrained: Mapping[str, KeyValue] | None = None,
                gate_gradient: GateGradient = "straight-through") -> ProcessorHandle:
    """Install a fresh (zero-initialised) :class:`RRAProcessor` on each layer in ``names``.

    ``capture``: given to the layers in ``capture_names`` (all of ``names`` when None).
    ``pretrained``: float32 K/V to copy W'_k, W'_v from, by processor name
    (:func:`~eqdiff.method.attention.float32_projections`); the layers' own when None.
    """
    names = list(names)
    capturing = set(names if capture_names is None else capture_names)

    def make(name: str, module: Attention, _current: object) -> RRAProcessor:
        _check_plain_self_attention(name, module)
        return RRAProcessor(module, name, bank, capture if name in capturing else None,
                            pretrained=None if pretrained is None else pretrained[name],
                            gate_gradient=gate_gradient)

    return install_processors(unet, names, make)


def rra_parameters(handle: ProcessorHandle) -> list[nn.Parameter]:
    return [p for processor in handle.installed.values() for p in processor.parameters()]


def rra_learned_tensors(handle: ProcessorHandle) -> dict[str, Tensor]:
    """RRA weights by concept-file name (``eqdiff_rra.<layer>.to_out.weight``, …)."""
    return {f"{RRA_PREFIX}{name.removesuffix('.processor')}.{pname}": param.detach().clone()
            for name, processor in handle.installed.items()
            for pname, param in processor.named_parameters()}


def rra_layers_of(tensors: Mapping[str, Tensor]) -> list[str]:
    """Processor names of the layers that ``tensors`` (a concept's) hold RRA weights for."""
    layers = {key.removeprefix(RRA_PREFIX).rsplit(".", 2)[0] for key in tensors
              if key.startswith(RRA_PREFIX)}
    return sorted(f"{layer}.processor" for layer in layers)


def load_rra_tensors(handle: ProcessorHandle, tensors: Mapping[str, Tensor]) -> None:
    """Copy saved RRA weights into the processors of ``handle`` (names and shapes must match)."""
    expected = rra_learned_tensors(handle)
    given = {k for k in tensors if k.startswith(RRA_PREFIX)}
    if given != set(expected):
        missing, extra = sorted(set(expected) - given)[:3], sorted(given - set(expected))[:3]
        raise ValueError(f"RRA tensors do not match these layers: missing {missing}, "
                         f"unexpected {extra}")
    for key, current in expected.items():
        if tensors[key].shape != current.shape:
            raise ValueError(f"{key}: shape {tuple(tensors[key].shape)} does not match the "
                             f"layer's {tuple(current.shape)}")
    with torch.no_grad():
        for name, processor in handle.installed.items():
            layer = name.removesuffix(".processor")
            for pname, param in processor.named_parameters():
                param.copy_(tensors[f"{RRA_PREFIX}{layer}.{pname}"])


def frozen_reference_unet(unet: UNet2DConditionModel, *,
                          share_weights: bool = True) -> UNet2DConditionModel:
    """A frozen, eval-mode copy of ``unet`` with plain attention processors everywhere.

    ``share_weights`` (default): parameters and buffers are the *same* tensors as ``unet``'s
    (no extra memory; SD-1.5 would otherwise add 3.4 GB in fp32) except the cross-attention
    K/V projections, which are private clones (≈ 19 M parameters in SD-1.5): at inference a
    concept's K/V are written into the base UNet's weights, and the reference must keep
    seeing the base model's. The base weights are frozen in training (every trainable tensor
    lives in a processor), so sharing is read-only. Move it together with ``unet``.
    """
    memo: dict[int, object] = {}
    if share_weights:
        private = {id(p) for name, p in unet.named_parameters()
                   if ".attn2.to_k." in name or ".attn2.to_v." in name}
        memo = {id(t): t for t in itertools.chain(unet.parameters(), unet.buffers())
                if id(t) not in private}
    reference = copy.deepcopy(unet, memo)
    reference.set_attn_processor(AttnProcessor2_0())  # drops any copied custom processors
    return reference.requires_grad_(False).eval()


def reference_indices(instance_indices: Tensor, count: int, *, step: int, seed: int,
                      choice: str) -> Tensor:
    """Per instance row, the index of its training reference photo. Returns (Bi,) long.

    ``"same"``: the row's own photo. ``"other"``: another photo of the subject,
    ``(i + o) mod N`` with ``o`` uniform in [1, N-1], drawn from a generator seeded by
    (seed, step) — stateless, so a resumed run draws the same references without any state
    in the checkpoint. With a single photo, ``"other"`` falls back to that photo.
    """
    if choice == "same" or count == 1:
        return instance_indices.clone()
    digest = hashlib.sha256(f"rra-reference/{seed}/{step}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    offsets = torch.randint(1, count, instance_indices.shape, generator=generator)
    return (instance_indices + offsets.to(instance_indices.device)) % count


def augment_prior_images(images: Tensor) -> Tensor:
    """The reference for a class (prior) image: flipped left-right, centre 7/8 crop resized
    back (bilinear, antialiased). images: (M, 3, H, W) float in [-1, 1] → same shape."""
    side_h, side_w = images.shape[-2:]
    crop_h, crop_w = side_h * 7 // 8, side_w * 7 // 8
    top, left = (side_h - crop_h) // 2, (side_w - crop_w) // 2
    cropped = images.flip(-1)[..., top:top + crop_h, left:left + crop_w]
    return F.interpolate(cropped, size=(side_h, side_w), mode="bilinear", antialias=True,
                         align_corners=False).clamp(-1, 1)


class RRAExtension:
    """RRA for :func:`eqdiff.method.training.train_concept` (the ``TrainingExtension`` seam):
    provides the method switch ``rra`` (and ``rra_loss`` when the method turns it on).

    Per step: each instance row's reference is another photo of the subject
    (:func:`reference_indices`), each prior row's an augmented copy of its class image
    (:func:`augment_prior_images`); references are VAE latent means, noised with the row's ε at
    ``max(t - gap, 0)`` and run through the frozen reference UNet (under ``no_grad``: the bank
    is a constant for the step), filling the bank that the trained UNet's RRA processors read.
    The reference UNet is conditioned (``rra.reference_prompt``) on the instance prompt with
    the placeholder's initial table row and, for prior rows, the class prompt
    (``"initial-row"``), or on each row's own prompt states (``"learned"``).

    With ``method.rra_loss`` the RRA attention loss (``"rra"``, on instance rows; target: the
    row's mask, reference: its reference photo's mask) takes ``losses.rra_loss_form``:
    ``"released"``, :func:`eqdiff.method.losses.pooled_rra_attention_loss` on the up-block
    layers whose query grid side is ``loss_resolution``, heads and layers averaged first;
    ``"per-layer"``, the mean of :func:`eqdiff.method.losses.rra_attention_loss` over the
    layers whose side is at most ``loss_resolution``.
    """

    def __init__(self, config: RRAConfig, method: MethodConfig, *,
                 loss_resolution: int = DEFAULT_LOSS_RESOLUTION,
                 share_weights: bool = True) -> None:
        if not method.rra:
            raise ValueError(f"method {method.name!r} has rra=False; do not pass RRAExtension")
        self.config, self.method = config, method
        self.provides = frozenset({"rra", "rra_loss"} if method.rra_loss else {"rra"})
        self.loss_resolution = loss_resolution
        self.share_weights = share_weights
        self.bank = ReferenceBank()
        self.capture: ReferenceAttentionCapture | None = None  # made at install, with the loss
        self.loss_form: RRALossForm = "released"
        self.handle: ProcessorHandle | None = None
        self.reference_unet: UNet2DConditionModel | None = None
        self.scheduler: DDPMScheduler | None = None
        self.seed = 0
        self.instance_references = self.masks = torch.empty(0)  # (N, C, h, w), (N, 1, H, W)
        self.prior_references = torch.empty(0)  # (M, C, h, w) latents of augmented class images
        # (Bi + Bp, L, D) reference-pass prompt states ("initial-row"); None: the rows' own
        self.reference_states: Tensor | None = None

    def install(self, trainer: ConceptTrainer, data: ConceptData) -> None:
        """Copy the reference UNet, install RRA on the trained UNet, encode the references."""
        unet = trainer.components.unet
        names = rra_layer_names(unet, self.config.blocks)
        loss_names = names
        if self.method.rra_loss:
            self.loss_form = trainer.config.losses.rra_loss_form
            released = self.loss_form == "released"
            if released:
                loss_names = [name for name in names if name.startswith(BLOCK_PREFIXES["up"])]
                if not loss_names:
                    raise ValueError(f"the released RRA loss reads up-block layers, and rra.blocks "
                                     f"{self.config.blocks} has none: add 'up' or set "
                                     "losses.rra_loss_form='per-layer'")
                # the coarsest up-block layers: 16×16 for SD-1.x at 512 px, as released
                sides = cross_attention_sides(unet, trainer.instance_latents[Band.FULL][0]
                                              .shape[-1])
                self.loss_resolution = min(sides[name.replace(".attn1.", ".attn2.")]
                                           for name in loss_names)
            self.capture = ReferenceAttentionCapture(
                self.loss_resolution, min_side=self.loss_resolution if released else 1)
        self.reference_unet = frozen_reference_unet(unet, share_weights=self.share_weights)
        install_reference_writers(self.reference_unet, self.bank, names)
        self.handle = install_rra(unet, self.bank, names, capture=self.capture,
                                  capture_names=loss_names,
                                  pretrained=trainer.pretrained_projections,
                                  gate_gradient=self.config.gate_gradient)
        self.scheduler = trainer.components.noise_scheduler
        self.seed = trainer.config.train.seed
        self.instance_references = trainer.instance_latents[Band.FULL][0]  # latent means
        self.masks = trainer.pixel_masks
        if trainer.prior_batch:
            augmented = augment_prior_images(data.prior_images.to(trainer.device, torch.float32))
            self.prior_references = trainer.encode_distribution(augmented)[0]
        if self.config.reference_prompt == "initial-row":
            self.reference_states = initial_row_states(trainer)
        logger.info("RRA on %d layers (%s), weights %s", len(names), "+".join(self.config.blocks),
                    "shared" if self.share_weights else "copied")

    def parameters(self) -> list[nn.Parameter]:
        assert self.handle is not None, "install() first"
        return rra_parameters(self.handle)

    def networks(self) -> list[nn.Module]:
        assert self.reference_unet is not None, "install() first"
        return [self.reference_unet]

    def draw(self, step: int, instance_indices: Tensor) -> dict[str, Tensor]:
        """Each instance row's reference photo for this step (host side, stateless)."""
        rows = reference_indices(instance_indices, self.instance_references.shape[0],
                                 step=step, seed=self.seed, choice=self.config.reference)
        return {REFERENCE_ROWS: rows}

    @torch.no_grad()
    def _reference_pass(self, batch: StepBatch) -> None:
        latents = self.instance_references[batch.draws[REFERENCE_ROWS]]
        if batch.prior_indices.numel():
            latents = torch.cat([latents, self.prior_references[batch.prior_indices]])
        timesteps = (batch.timesteps - self.config.timestep_gap).clamp_min(0)
        noisy = self.scheduler.add_noise(latents, batch.noise, timesteps)
        states = (batch.encoder_states.detach() if self.reference_states is None
                  else self.reference_states)
        self.reference_unet(noisy, timesteps, states)

    def before_unet(self, batch: StepBatch) -> None:
        self.bank.clear()
        self._reference_pass(batch)
        if self.capture is not None:
            self.capture.begin()

    def loss_terms(self, batch: StepBatch) -> dict[str, Tensor]:
        if self.capture is None:
            return {}
        probs = self.capture.probabilities()
        if not probs:
            sides = (f"of side {self.loss_resolution} in an up block"
                     if self.loss_form == "released" else f"of side <= {self.loss_resolution}")
            raise RuntimeError(f"no RRA layer has a query grid {sides}; change loss_resolution "
                               "or losses.rra_loss_form")
        bi = batch.instance_count
        targets = self.masks[batch.instance_indices]
        references = self.masks[batch.draws[REFERENCE_ROWS]]
        if self.loss_form == "released":  # heads and layers pooled into one map first
            pooled = torch.cat([p[:bi] for p in probs], dim=1).float().mean(dim=1)
            return {"rra": pooled_rra_attention_loss(pooled, targets, references)}
        losses = [rra_attention_loss(p[:bi], targets, references) for p in probs]
        return {"rra": torch.stack(losses).mean()}

    def after_step(self) -> None:
        self.bank.clear()
        if self.capture is not None:
            self.capture.clear()

    def learned_tensors(self) -> dict[str, Tensor]:
        assert self.handle is not None, "install() first"
        return rra_learned_tensors(self.handle)

    def load_learned_tensors(self, tensors: dict[str, Tensor]) -> None:
        assert self.handle is not None, "install() first"
        load_rra_tensors(self.handle, tensors)

    def remove(self) -> None:
        """Put back the trained UNet's processors and drop the reference UNet and bank."""
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
        self.reference_unet = None
        self.bank.clear()


@torch.no_grad()
def initial_row_states(trainer: ConceptTrainer) -> Tensor:
    """The released reference-pass conditioning (docs/method.md §5): the instance prompt
    encoded with the placeholder's own table row (the initializer's embedding; no learned
    vector injected) for the instance rows, the class prompt for the prior rows.
    Returns (Bi + Bp, L, D) float32 on the trainer's device, fixed for the run."""
    amp = trainer.amp_dtype
    autocast = torch.autocast(trainer.device.type, dtype=amp or torch.float32,
                              enabled=amp is not None)
    with autocast, trainer.embeddings.table_row():
        instance = trainer.components.text_encoder(trainer.instance_ids)[0].float()
    rows = [instance.expand(trainer.train.instance_batch, -1, -1)]
    if trainer.prior_batch:
        rows.append(trainer.class_states.expand(trainer.prior_batch, -1, -1))
    return torch.cat(rows)


def training_extensions(config: RRAConfig, method: MethodConfig) -> list[RRAExtension]:
    """The extensions a caller passes to :func:`~eqdiff.method.training.train_concept` for
    ``method`` (the trainer builds the K/V and mask-loss ones itself): RRA when it is on."""
    return [RRAExtension(config, method)] if method.rra else []
