"""``train_concept``: one customization run for one subject and one method (METHOD.md §2–4, §6–7).

The loop reads top to bottom: draw a batch, noise it, predict, compute the losses, step.
Everything fixed is computed once before the loop (latent distributions of the full, low and
high band images, latent masks, the class prompt's embeddings, tokenised prompts). All
randomness comes from one CPU ``torch.Generator`` seeded from the config, so a run is
reproducible on any device and a checkpoint (learned tensors, optimizer state, step,
generator state) resumes bit-identically. Side effects — progress, checkpoints, validation
images — are callbacks. RRA (and any other UNet extension) plugs in through
:class:`TrainingExtension`.

A step has two halves. The host half draws every random number of the step from the CPU
generator (:class:`StepDraws`) and copies them into persistent device buffers; the device half
reads only those buffers and tensors fixed at set-up, so it has the same shapes and the same
memory every step. On CUDA (``train.cuda_graphs``) the device half — text encoder, reference
pass, UNet, losses, backward, clipping and the fused AdamW update — is captured once as a CUDA
graph after a few eager warm-up steps and replayed from then on: one launch per step instead of
thousands, with the same kernels on the same data. With ``train.compile`` the UNet's and
the text encoder's blocks (and the extensions' networks: RRA's reference UNet) run as
``torch.compile``d regions (:mod:`eqdiff.method.compilation`), compiled during the first step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqdiff.config import MethodConfig, RunConfig, config_hash, to_dict
from eqdiff.method.attention import (
    CrossAttentionCapture,
    ProcessorHandle,
    cross_attention_sides,
    install_custom_kv,
    kv_learned_tensors,
    kv_parameters,
    load_kv_tensors,
)
from eqdiff.method.compilation import CompiledRegions, compile_regions, compiled_calls
from eqdiff.method.embeddings import (
    EmbeddingHandle,
    PlaceholderEmbeddings,
    add_placeholder_token,
    install_placeholder_embeddings,
)
from eqdiff.method.frequency import BAND_ORDER, Band, frequency_band, sample_bands
from eqdiff.method.losses import (
    cross_attention_mask_loss,
    latent_masks,
    masked_diffusion_loss,
    masked_noising,
    prior_preservation_loss,
    total_loss,
)
from eqdiff.method.models import SDComponents, model_identity

logger = logging.getLogger(__name__)

INSTANCE_PROMPT = "photo of a {token} {class_noun}"
CLASS_PROMPT = "{class_noun}"
# the trainer's own step inputs; any other buffer is an extension's draw
STEP_INPUTS = frozenset({"instance_indices", "band_slots", "latent_eps", "prior_indices",
                         "noise", "timesteps"})
# eager steps before the capture (on a side stream, as CUDA graph capture requires)
CUDA_GRAPH_WARMUP_STEPS = 3


@dataclass
class ConceptData:
    """What one subject contributes to training, as tensors on any device.

    images: (N, 3, H, W) float in [-1, 1]; masks: (N, 1, H, W) in {0, 1} at pixel size;
    prior_images: (M, 3, H, W) class images in [-1, 1] (M may be 0).
    """

    subject: str
    class_noun: str
    images: Tensor
    masks: Tensor
    prior_images: Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3 or self.images.shape[0] < 1:
            raise ValueError(f"{self.subject}: images must be (N>=1, 3, H, W), got "
                             f"{tuple(self.images.shape)}")
        if self.masks.shape != (self.images.shape[0], 1, *self.images.shape[2:]):
            raise ValueError(f"{self.subject}: masks must be (N, 1, H, W) matching the images, "
                             f"got {tuple(self.masks.shape)} for {tuple(self.images.shape)}")
        if self.prior_images.ndim != 4 or self.prior_images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"{self.subject}: prior images must be (M, 3, H, W) like the "
                             f"instance images, got {tuple(self.prior_images.shape)}")


@dataclass
class StepBatch:
    """One step's device tensors, shared with extensions (RRA reads indices, timesteps, noise
    and its own draws). They live in the trainer's step buffers, so under a CUDA graph an
    extension sees the same tensors every step.

    Rows are the Bi instance samples, then the Bp prior (class) samples.
    """

    instance_indices: Tensor  # (Bi,) long
    timesteps: Tensor  # (Bi + Bp,) long
    noise: Tensor  # (Bi + Bp, C, h, w)
    noisy_latents: Tensor  # (Bi + Bp, C, h, w)
    latent_masks: Tensor  # (Bi, 1, h, w)
    encoder_states: Tensor  # (Bi + Bp, L, D)
    instance_count: int
    prior_indices: Tensor  # (Bp,) long: which class image each prior row shows
    draws: dict[str, Tensor] = field(default_factory=dict)  # extensions' draws, on the device


@dataclass
class StepDraws:
    """Every random number of one step, drawn on the host in a fixed order (see
    :meth:`ConceptTrainer.draw`). ``tensors`` are CPU tensors whose shapes are the same every
    step; ``bands`` names each instance row's band (``tensors["band_slots"]`` indexes them)."""

    bands: tuple[Band, ...]
    tensors: dict[str, Tensor]


class TrainingExtension(Protocol):
    """A UNet extension trained with the concept (RRA implements this).

    ``install`` runs once the trainer has loaded the model onto its device and encoded the
    data (``trainer.instance_latents``, ``trainer.pixel_masks``, …); ``remove`` undoes it when
    the run ends.
    """

    prefix: str

    def install(self, trainer: ConceptTrainer, data: ConceptData) -> None: ...

    def remove(self) -> None: ...

    def parameters(self) -> list[nn.Parameter]: ...

    def networks(self) -> list[nn.Module]:
        """Frozen networks the extension runs every step (compiled with the UNet under
        ``train.compile``)."""
        ...

    def draw(self, step: int, instance_indices: Tensor) -> dict[str, Tensor]:
        """This step's random choices as CPU tensors of fixed shapes (keys start with
        ``prefix``); they reach :meth:`before_unet` on the device as ``batch.draws``. The device
        half of a step must not draw or copy from the host itself (it may be a CUDA graph)."""
        ...

    def before_unet(self, batch: StepBatch) -> None: ...

    def loss_terms(self, batch: StepBatch) -> dict[str, Tensor]: ...

    def after_step(self) -> None: ...

    def learned_tensors(self) -> dict[str, Tensor]: ...

    def load_learned_tensors(self, tensors: dict[str, Tensor]) -> None: ...


@dataclass
class StepResult:
    """One finished step. The loss values stay on the device until :attr:`losses` is read."""

    step: int  # 1-based count of finished steps
    total_steps: int
    loss_names: tuple[str, ...]
    loss_values: Tensor  # (len(loss_names),) float32 on the device, detached
    bands: tuple[Band, ...]

    @property
    def losses(self) -> dict[str, float]:
        """``{"loss": total, "loss/<name>": part, ...}``; reading it synchronises the device."""
        return dict(zip(self.loss_names, self.loss_values.tolist(), strict=True))


class TrainingCallback:
    """Hooks for side effects; every method is optional."""

    def on_start(self, start_step: int, total_steps: int) -> None:
        """Called once before the first step (``start_step`` > 0 when resuming)."""

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        """Called after every optimizer step."""

    def on_end(self, trainer: ConceptTrainer) -> None:
        """Called once after the last step."""


@dataclass
class TrainedConcept:
    """The learned tensors (by concept-file name) and a record of the run."""

    tensors: dict[str, Tensor]
    metadata: dict
    loss_history: list[dict[str, float]] = field(default_factory=list)


def training_hash(config: RunConfig, method: MethodConfig) -> str:
    """Hash of everything that changes a trained concept (not storage, not sampling); the base
    model enters by identity too, so weights replaced at the same path retrain."""
    return config_hash(config.model, model_identity(config.model.base_model), method,
                       config.train, config.frequency, config.masks, config.rra, config.losses)


def autocast_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA ("auto"), none (fp32) on CPU."""
    precision = config.train.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def frozen_weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the trainer casts frozen weights to once at set-up; None: left as loaded.

    bf16 when autocast is bf16 (``precision`` "auto" on CUDA, or "bf16") and
    ``train.frozen_weights`` is "auto": autocast would otherwise cast every frozen weight to
    bf16 on every step. fp16 autocast keeps them as loaded (an fp16 VAE/UNet can overflow).
    """
    if config.train.frozen_weights == "auto" and autocast_dtype(config, device) == torch.bfloat16:
        return torch.bfloat16
    return None


def cuda_graph_mode(config: RunConfig, device: torch.device) -> Literal["on", "auto", "off"]:
    """Whether the trainer captures its step as a CUDA graph: never off CUDA; on CUDA
    ``train.cuda_graphs`` ("auto" falls back to eager steps, with a warning, if the capture
    fails; "on" raises instead)."""
    return config.train.cuda_graphs if device.type == "cuda" else "off"


class ConceptTrainer:
    """Holds the state of one training run; :func:`train_concept` drives it."""

    def __init__(self, components: SDComponents, data: ConceptData, config: RunConfig,
                 method: MethodConfig, *, device: torch.device | str = "cpu",
                 extensions: Sequence[TrainingExtension] = ()) -> None:
        self.components = components.freeze()
        self.config, self.method = config, method
        self.device = torch.device(device)
        self.extensions = list(extensions)
        self.total_steps = config.train.steps
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.amp_dtype = autocast_dtype(config, self.device)
        self.frozen_dtype = frozen_weight_dtype(config, self.device)
        self._logged: list[dict[str, float]] = []
        # per-step loss values kept on the device, converted in one transfer when read
        self._pending_losses: list[tuple[tuple[str, ...], Tensor]] = []
        self._handles: list[EmbeddingHandle | ProcessorHandle] = []
        # the device half of a step reads these buffers (the same memory every step)
        self._inputs: dict[str, Tensor] = {}
        self.graph_mode = cuda_graph_mode(config, self.device)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_names: tuple[str, ...] = ()
        self._graph_values = torch.empty(0)
        self._warm_steps = 0
        self._side_stream: torch.cuda.Stream | None = None
        self.compiled: CompiledRegions | None = None
        self._install(data)
        self._precompute(data)
        for extension in self.extensions:
            extension.install(self, data)
        if self.frozen_dtype is not None:  # after every set-up encode: those stay float32
            self.components.vae.to(self.frozen_dtype)
        if config.train.compile == "regional":  # after every copy of the UNet (RRA's reference)
            self.compiled = compile_regions(
                self.components.unet, self.components.text_encoder,
                *(network for extension in self.extensions for network in extension.networks()))
        params = self.trainable_parameters()
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            params, lr=config.train.learning_rate,
            betas=(config.train.adam_beta1, config.train.adam_beta2),
            weight_decay=config.train.weight_decay, eps=config.train.adam_epsilon,
            fused=cuda, capturable=cuda)  # capturable: the step count stays on the device

    # ------------------------------------------------------------------ set-up
    def _install(self, data: ConceptData) -> None:
        c = self.components
        tcfg = self.config.train
        self.token_id, initial = add_placeholder_token(
            c.tokenizer, c.text_encoder, tcfg.placeholder_token, tcfg.initializer_token)
        c.to(self.device)
        if self.frozen_dtype is not None:  # before any processor (trainable) is installed
            c.text_encoder.to(self.frozen_dtype)  # table rows keep their values, in bf16
            c.unet.to(self.frozen_dtype)
        self.embeddings = PlaceholderEmbeddings(
            initial, frequency_decomposed=self.method.fdte).to(self.device)
        self._handles.append(install_placeholder_embeddings(c.text_encoder, self.token_id,
                                                            self.embeddings))
        self.capture = None
        if self.method.xattn_loss:
            resolution = self.config.losses.xattn_resolution
            latent_side = c.latent_size(data.images.shape[-1])
            has_grid = resolution in cross_attention_sides(c.unet, latent_side).values()
            self.capture = CrossAttentionCapture(resolution if has_grid else None)
        self.kv_handle: ProcessorHandle | None = None
        if self.method.train_kv or self.capture is not None:
            self.kv_handle = install_custom_kv(c.unet, train_kv=self.method.train_kv,
                                               capture=self.capture)
            self._handles.append(self.kv_handle)
        self.class_noun = data.class_noun

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = [self.embeddings.vectors]
        if self.kv_handle is not None:
            params += kv_parameters(self.kv_handle)
        for extension in self.extensions:
            params += extension.parameters()
        return params

    @torch.no_grad()
    def encode_distribution(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """VAE latent mean and std (scaled by the VAE's scaling factor), encoded in chunks.

        images: (N, 3, H, W) in [-1, 1] → two (N, C, h, w) float32 tensors on the device.
        """
        vae = self.components.vae
        means, stds = [], []
        for chunk in images.split(8):
            dist = vae.encode(chunk.to(self.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        scale = vae.config.scaling_factor
        return torch.cat(means) * scale, torch.cat(stds) * scale

    @torch.no_grad()
    def _precompute(self, data: ConceptData) -> None:
        c, fcfg = self.components, self.config.frequency
        images = data.images.to(self.device, torch.float32)
        self.instance_count = images.shape[0]
        versions = {Band.FULL: images}
        if self.method.fdte:  # band images are fixed per concept image: filter once
            versions[Band.LOW] = frequency_band(images, Band.LOW, fcfg)
            versions[Band.HIGH] = frequency_band(images, Band.HIGH, fcfg)
        self.instance_latents = {band: self.encode_distribution(v)
                                 for band, v in versions.items()}
        # every band's latent distribution stacked, indexed on the device by the drawn slots
        self._band_slots = {band: slot for slot, band in enumerate(
            b for b in BAND_ORDER if b in self.instance_latents)}
        self._band_means = torch.stack([self.instance_latents[b][0] for b in self._band_slots])
        self._band_stds = torch.stack([self.instance_latents[b][1] for b in self._band_slots])
        self._band_mixes = torch.cat([self.embeddings.mix_for_bands([b])
                                      for b in self._band_slots])
        latent_side = self.instance_latents[Band.FULL][0].shape[-1]
        mcfg = self.config.masks
        pixel_masks = data.masks.to(self.device, torch.float32)
        self.pixel_masks = pixel_masks
        self.latent_masks = latent_masks(pixel_masks, latent_side,
                                         iterations=mcfg.dilation_iterations,
                                         kernel=mcfg.dilation_kernel)
        use_prior = (self.method.prior_preservation and self.config.train.prior_batch > 0
                     and data.prior_images.shape[0] > 0)
        self.prior_batch = self.config.train.prior_batch if use_prior else 0
        self.prior_latents = (self.encode_distribution(data.prior_images) if use_prior
                              else None)
        tokenize = c.tokenizer
        prompt = INSTANCE_PROMPT.format(token=self.config.train.placeholder_token,
                                        class_noun=data.class_noun)
        self.instance_ids = tokenize(prompt, padding="max_length", truncation=True,
                                     max_length=tokenize.model_max_length,
                                     return_tensors="pt").input_ids.to(self.device)
        if not bool((self.instance_ids == self.token_id).any()):
            raise ValueError(f"the instance prompt {prompt!r} lost its placeholder to truncation")
        if use_prior:
            class_ids = tokenize(CLASS_PROMPT.format(class_noun=data.class_noun),
                                 padding="max_length", truncation=True,
                                 max_length=tokenize.model_max_length,
                                 return_tensors="pt").input_ids.to(self.device)
            with self._autocast():
                self.class_states = c.text_encoder(class_ids)[0].float()  # fixed: no placeholder

    def _autocast(self) -> torch.autocast:
        # no cast cache with graphs: cached casts would outlive the captured region
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None,
                              cache_enabled=self.graph_mode == "off")

    # ------------------------------------------------------------------ the step
    def draw(self) -> StepDraws:
        """The host half's draws for the next step, from the CPU generator.

        The draw order is fixed (a resumed run replays it bit-identically): instance photo
        indices, bands, one latent ε per instance row, prior indices, prior latent ε, noise,
        timesteps; then each extension's own (stateless) draws.
        """
        tcfg, gen = self.config.train, self.generator
        bi, bp = tcfg.instance_batch, self.prior_batch
        instance_indices = torch.randint(self.instance_count, (bi,), generator=gen)
        bands = (sample_bands(bi, self.config.frequency, gen) if self.method.fdte
                 else (Band.FULL,) * bi)
        shape = self.instance_latents[Band.FULL][0].shape[1:]
        eps = [torch.randn((1, *shape), generator=gen) for _ in range(bi)]
        prior_indices = torch.empty(0, dtype=torch.long)
        if bp:
            prior_indices = torch.randint(self.prior_latents[0].shape[0], (bp,), generator=gen)
            eps.append(torch.randn((bp, *shape), generator=gen))
        noise = torch.randn((bi + bp, *shape), generator=gen)
        timesteps = torch.randint(self.components.noise_scheduler.config.num_train_timesteps,
                                  (bi + bp,), generator=gen)
        tensors = {"instance_indices": instance_indices,
                   "band_slots": torch.tensor([self._band_slots[b] for b in bands]),
                   "latent_eps": torch.cat(eps), "prior_indices": prior_indices,
                   "noise": noise, "timesteps": timesteps}
        for extension in self.extensions:
            tensors.update(extension.draw(self.step, instance_indices))
        return StepDraws(bands, tensors)

    def _upload(self, draws: StepDraws) -> None:
        """Copy the draws into the persistent device buffers (on CUDA through pinned memory,
        without blocking); the buffers keep their memory, which a captured graph reads."""
        for name, tensor in draws.tensors.items():
            buffer = self._inputs.get(name)
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                if self._graph is not None:
                    raise RuntimeError(f"step input {name!r} changed shape or dtype after the "
                                       "CUDA graph was captured")
                buffer = self._inputs[name] = torch.empty_like(tensor, device=self.device)
            source = tensor.pin_memory() if self.device.type == "cuda" else tensor
            buffer.copy_(source, non_blocking=True)

    def _device_batch(self) -> StepBatch:
        """The step's latents, noising and masks, computed on the device from the buffers."""
        x = self._inputs
        bi, bp = self.config.train.instance_batch, self.prior_batch
        indices, slots, eps = x["instance_indices"], x["band_slots"], x["latent_eps"]
        latents = self._band_means[slots, indices] + self._band_stds[slots, indices] * eps[:bi]
        if bp:
            mean, std = self.prior_latents
            prior = x["prior_indices"]
            latents = torch.cat([latents, mean[prior] + std[prior] * eps[bi:]])
        noise, timesteps = x["noise"], x["timesteps"]
        scheduler = self.components.noise_scheduler
        masks = self.latent_masks[indices]
        if self.method.mgdp:
            noisy_inst = masked_noising(latents[:bi], noise[:bi], timesteps[:bi], masks,
                                        scheduler)
        else:
            noisy_inst = scheduler.add_noise(latents[:bi], noise[:bi], timesteps[:bi])
        noisy = torch.cat([noisy_inst, scheduler.add_noise(latents[bi:], noise[bi:],
                                                           timesteps[bi:])])
        extension_draws = {name: x[name] for name in x if name not in STEP_INPUTS}
        return StepBatch(indices, timesteps, noise, noisy, masks,
                         encoder_states=torch.empty(0), instance_count=bi,
                         prior_indices=x["prior_indices"], draws=extension_draws)

    def _targets(self, batch: StepBatch) -> Tensor:
        scheduler = self.components.noise_scheduler
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return batch.noise
        raise ValueError(f"prediction type {kind!r} is not supported for customization "
                         "(SD-1.x predicts epsilon)")

    def _device_step(self) -> tuple[tuple[str, ...], Tensor]:
        """The device half: forward, losses, backward, clipping, the optimizer update.

        Reads only the step buffers and set-up tensors and never synchronises, so it can be
        captured as a CUDA graph. Returns the loss names and their (detached) values.
        """
        c = self.components
        batch = self._device_batch()
        bi = batch.instance_count
        mix = self._band_mixes[self._inputs["band_slots"]]
        with self._autocast():
            ids = self.instance_ids.expand(bi, -1)
            with self.embeddings.mixing(mix):
                instance_states = c.text_encoder(ids)[0]
            states = instance_states
            if self.prior_batch:
                states = torch.cat([instance_states, self.class_states.to(states.dtype)
                                    .expand(self.prior_batch, -1, -1)])
            batch.encoder_states = states
            for extension in self.extensions:
                extension.before_unet(batch)
            if self.capture is not None:
                token_rows = torch.zeros(states.shape[0], states.shape[1], dtype=torch.bool,
                                         device=self.device)
                token_rows[:bi] = ids == self.token_id
                self.capture.begin(token_rows)
            pred = c.unet(batch.noisy_latents, batch.timesteps, states).sample.float()
        target = self._targets(batch).float()
        if self.method.mgdp:
            parts = {"inst": masked_diffusion_loss(pred[:bi], target[:bi], batch.latent_masks)}
        else:
            parts = {"inst": F.mse_loss(pred[:bi], target[:bi])}
        if self.prior_batch:
            parts["prior"] = prior_preservation_loss(pred[bi:], target[bi:])
        if self.capture is not None:
            resolution = self.config.losses.xattn_resolution
            maps = self.capture.maps_at(resolution)[:bi]
            parts["xattn"] = cross_attention_mask_loss(
                maps, self.pixel_masks[batch.instance_indices], resolution)
            self.capture.clear()
        for extension in self.extensions:
            parts.update(extension.loss_terms(batch))
        losses = total_loss(parts, self.config.losses)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for extension in self.extensions:
            extension.after_step()
        return losses.stacked()

    def _run_device_step(self) -> tuple[tuple[str, ...], Tensor]:
        """Run the device half eagerly, as a warm-up step on a side stream, or as a graph."""
        if self._graph is not None:
            self._graph.replay()
            return self._graph_names, self._graph_values.clone()  # the next replay overwrites
        if self.graph_mode == "off":
            return self._device_step()
        if self._warm_steps >= CUDA_GRAPH_WARMUP_STEPS:
            try:
                return self._capture()
            except Exception as err:  # noqa: BLE001 — any capture failure: continue eagerly
                if self.graph_mode == "on":
                    raise
                self.optimizer.zero_grad(set_to_none=True)  # gradients the capture left
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                self.graph_mode = "off"
                logger.warning("CUDA graph capture failed (%s: %s); this run continues "
                               "without graphs", type(err).__name__, str(err).splitlines()[0])
                return self._device_step()
        if self._side_stream is None:  # capture wants the warm-up off the main stream
            self._side_stream = torch.cuda.Stream(self.device)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            result = self._device_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._warm_steps += 1
        return result

    def _capture(self) -> tuple[tuple[str, ...], Tensor]:
        """Capture the device half as a CUDA graph, then replay it once for this step."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            names, values = self._device_step()
        self._graph, self._graph_names, self._graph_values = graph, names, values
        logger.info("captured the training step as a CUDA graph after %d eager steps",
                    self._warm_steps)
        graph.replay()
        return names, values.clone()

    def _drop_graph(self) -> None:
        """Release the captured graph and its memory pool (if any)."""
        if self._graph is None:
            return
        self._graph = None
        self._graph_values = torch.empty(0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    @property
    def graph_captured(self) -> bool:
        """Whether steps now replay a captured CUDA graph."""
        return self._graph is not None

    def train_step(self) -> StepResult:
        draws = self.draw()
        self._upload(draws)
        with compiled_calls(self.compiled, "train.compile"):
            names, values = self._run_device_step()
        self.step += 1
        self._pending_losses.append((names, values))
        return StepResult(self.step, self.total_steps, names, values, draws.bands)

    @property
    def loss_history(self) -> list[dict[str, float]]:
        """Logged losses of every finished step, one dict per step (see :attr:`StepResult.losses`).

        Steps keep their values on the device; reading the history converts all pending ones
        in a single transfer (so the step itself never waits for the device).
        """
        if self._pending_losses:
            flat = torch.cat([values for _, values in self._pending_losses]).tolist()
            start = 0
            for names, _ in self._pending_losses:
                self._logged.append(dict(zip(names, flat[start:start + len(names)],
                                             strict=True)))
                start += len(names)
            self._pending_losses = []
        return list(self._logged)

    # ------------------------------------------------------------------ state
    def learned_tensors(self) -> dict[str, Tensor]:
        tensors = self.embeddings.learned_tensors()
        if self.kv_handle is not None:
            tensors.update(kv_learned_tensors(self.kv_handle))
        for extension in self.extensions:
            tensors.update(extension.learned_tensors())
        return {name: t.detach().float().cpu().contiguous() for name, t in tensors.items()}

    def state_dict(self) -> dict:
        """Everything a resume needs; only tensors and plain values (loads with weights_only)."""
        return {"step": self.step, "learned": self.learned_tensors(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "loss_history": self.loss_history,
                "training_hash": training_hash(self.config, self.method)}

    def load_state_dict(self, state: dict) -> None:
        expected = training_hash(self.config, self.method)
        if state["training_hash"] != expected:
            raise ValueError(f"checkpoint was made with another configuration "
                             f"({state['training_hash']} != {expected}); not resuming from it")
        learned = state["learned"]
        with torch.no_grad():
            self.embeddings.vectors.copy_(learned["eqdiff_token.vectors"])
        if self.kv_handle is not None and self.method.train_kv:
            load_kv_tensors(self.kv_handle, learned)
        for extension in self.extensions:
            extension.load_learned_tensors(learned)
        # the optimizer gets new state tensors, which a captured graph would not see: drop it
        # (a new one is captured after the warm-up steps)
        self._drop_graph()
        self._warm_steps = 0
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self._logged = list(state["loss_history"])
        self._pending_losses = []

    def remove(self) -> None:
        """Uninstall hooks and processors: the base model is as it was loaded (plus the token)."""
        self._drop_graph()
        if self.compiled is not None:
            self.compiled.remove()
        for extension in reversed(self.extensions):
            extension.remove()
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []


class Checkpointer(TrainingCallback):
    """Writes ``last.pt`` every ``every`` steps (atomically) and resumes from it.

    The file holds tensors and plain values only and is read with ``weights_only=True``.
    """

    def __init__(self, folder: str | Path, every: int) -> None:
        self.folder = Path(folder)
        self.every = every

    @property
    def path(self) -> Path:
        return self.folder / "last.pt"

    def restore(self, trainer: ConceptTrainer) -> bool:
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        trainer.load_state_dict(state)
        logger.info("resumed %s from step %d", self.folder, trainer.step)
        return True

    def save(self, trainer: ConceptTrainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(trainer.state_dict(), partial)
        partial.replace(self.path)

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        if self.every and result.step % self.every == 0 and result.step < result.total_steps:
            self.save(trainer)


class ProgressBar(TrainingCallback):
    """A tqdm bar with the loss of every ``loss_every``-th step (shown on a terminal, quiet in
    logs otherwise)."""

    def __init__(self, description: str, loss_every: int = 25) -> None:
        self.description = description
        self.loss_every = loss_every  # the shown loss is read (a device sync) this often
        self._bar = None

    def on_start(self, start_step: int, total_steps: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc=self.description,
                         unit="step", leave=False)

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        self._bar.update(1)
        if result.step % self.loss_every == 0 or result.step == result.total_steps:
            self._bar.set_postfix(loss=f"{result.losses['loss']:.4f}")  # synchronises

    def on_end(self, trainer: ConceptTrainer) -> None:
        self._bar.close()


def train_concept(components: SDComponents, data: ConceptData, config: RunConfig,
                  method: MethodConfig, *, device: torch.device | str = "cpu",
                  checkpoint_dir: str | Path | None = None,
                  checkpointer: Checkpointer | None = None,
                  callbacks: Sequence[TrainingCallback] = (),
                  extensions: Sequence[TrainingExtension] = (),
                  stop_after: int | None = None) -> TrainedConcept:
    """Train one concept; resume from ``checkpoint_dir`` when it holds a checkpoint.

    ``checkpointer`` replaces the default file checkpointer of ``checkpoint_dir`` (e.g. one
    that also keeps the file in the artifact store).

    ``components`` are modified in place (token added, processors installed, then removed):
    load a fresh copy per concept. ``stop_after`` ends the run early after that many steps in
    total (used to simulate an interruption in tests).
    """
    started = time.perf_counter()
    if method.rra and not any(e.prefix == "eqdiff_rra." for e in extensions):
        raise ValueError(f"method {method.name!r} enables residual reference attention; pass "
                         "the RRA extension (or use a method with rra=False)")
    trainer = ConceptTrainer(components, data, config, method, device=device,
                             extensions=extensions)
    callbacks = list(callbacks)
    if checkpointer is None and checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, config.train.checkpoint_every)
    if checkpointer is not None:
        checkpointer.restore(trainer)
        callbacks.append(checkpointer)
    start = trainer.step
    last = trainer.total_steps if stop_after is None else min(stop_after, trainer.total_steps)
    try:
        for callback in callbacks:
            callback.on_start(start, trainer.total_steps)
        while trainer.step < last:
            result = trainer.train_step()
            for callback in callbacks:
                callback.on_step(result, trainer)
        if checkpointer is not None and trainer.step < trainer.total_steps:
            checkpointer.save(trainer)
        for callback in callbacks:
            callback.on_end(trainer)
        metadata = {
            "subject": data.subject, "class_noun": data.class_noun, "method": to_dict(method),
            "placeholder_token": config.train.placeholder_token,
            "training_hash": training_hash(config, method), "steps": trainer.step,
            "resumed_from_step": start, "seconds": round(time.perf_counter() - started, 3),
            "device": str(trainer.device), "instance_images": trainer.instance_count,
        }
        return TrainedConcept(trainer.learned_tensors(), metadata, trainer.loss_history)
    finally:
        trainer.remove()
