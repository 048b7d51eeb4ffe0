""":class:`ConceptTrainer`: the set-up and the step of one customization run (docs/method.md
§2–4, §6–7).

Everything fixed is computed once at set-up (latent distributions of the full, low and high
band images, latent masks, the class prompt's embeddings, tokenised prompts). All randomness
comes from one CPU ``torch.Generator`` seeded from the config, so a run is reproducible on any
device and its state (learned tensors, optimizer state, step, generator state) resumes
bit-identically. What a method adds to the UNet — K/V copies, the mask loss, RRA, the UNet
LoRA — comes in through :mod:`~eqdiff.method.training.extensions`.

A step has two halves. The host half draws every random number of the step from the CPU
generator (:class:`~eqdiff.method.training.batch.StepDraws`) and copies them into persistent
device buffers; the device half reads only those buffers and tensors fixed at set-up, so it
has the same shapes and the same memory every step, and on CUDA it runs as a captured graph
(:mod:`~eqdiff.method.training.graphed`). With ``train.compile`` the UNet's and the text
encoder's blocks (and the extensions' networks: RRA's reference UNet) run as
``torch.compile``d regions (:mod:`eqdiff.method.compilation`), compiled during the first step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eqdiff.config import (
    CLASS_WORD,
    MethodConfig,
    RunConfig,
    masked_loss_on,
    masked_noising_on,
)
from eqdiff.method.attention import float32_projections
from eqdiff.method.compilation import CompiledRegions, compile_regions, compiled_calls
from eqdiff.method.embeddings import (
    EmbeddingHandle,
    PlaceholderEmbeddings,
    add_placeholder_token,
    install_placeholder_embeddings,
)
from eqdiff.method.frequency import BAND_ORDER, Band, frequency_band, sample_bands
from eqdiff.method.identity import training_hash
from eqdiff.method.losses import (
    latent_masks,
    masked_diffusion_loss,
    masked_noising,
    prior_preservation_loss,
    total_loss,
)
from eqdiff.method.models import SDComponents
from eqdiff.method.training.batch import STEP_INPUTS, ConceptData, StepBatch, StepDraws
from eqdiff.method.training.callbacks import StepResult
from eqdiff.method.training.extensions import (
    TrainingExtension,
    adapter_extensions,
    builtin_extensions,
    check_extensions,
)
from eqdiff.method.training.graphed import GraphedStep, cuda_graph_mode
from eqdiff.method.training.precision import autocast_dtype, frozen_weight_dtype

logger = logging.getLogger(__name__)

INSTANCE_PROMPT = "photo of a {token} {class_noun}"
CLASS_PROMPT = "{class_noun}"


class ConceptTrainer:
    """Holds the state of one training run; :func:`~eqdiff.method.training.train_concept`
    drives it.

    ``extensions`` are the caller's (RRA); the trainer puts its own
    (:func:`~eqdiff.method.training.extensions.builtin_extensions`: the mask loss, the K/V
    copies) before them and its adapters
    (:func:`~eqdiff.method.training.extensions.adapter_extensions`: the UNet LoRA) after them,
    and refuses a method that turns on something no extension provides.
    """

    def __init__(self, components: SDComponents, data: ConceptData, config: RunConfig,
                 method: MethodConfig, *, device: torch.device | str = "cpu",
                 extensions: Sequence[TrainingExtension] = ()) -> None:
        self.extensions = [*builtin_extensions(method, config.losses), *extensions,
                           *adapter_extensions(method)]
        check_extensions(method, self.extensions)  # before anything is changed
        self.components = components.freeze()
        self.config, self.method = config, method
        self.device = torch.device(device)
        self.train = config.training(method)  # this method's recipe under the run's settings
        self.total_steps = self.train.steps
        self.step = 0
        self.generator = torch.Generator().manual_seed(config.train.seed)
        self.amp_dtype = autocast_dtype(config, self.device)
        self.frozen_dtype = frozen_weight_dtype(config, self.device)
        self._logged: list[dict[str, float]] = []
        # per-step loss values kept on the device, converted in one transfer when read
        self._pending_losses: list[tuple[tuple[str, ...], Tensor]] = []
        self._handles: list[EmbeddingHandle] = []
        # the device half of a step reads these buffers (the same memory every step)
        self._inputs: dict[str, Tensor] = {}
        graphs = cuda_graph_mode(config, self.device)
        if graphs != "off" and self.train.gradient_accumulation > 1:
            logger.info("%s accumulates %d micro-batches per step: its steps run without CUDA "
                        "graphs", method.name, self.train.gradient_accumulation)
            graphs = "off"
        self.graphed = GraphedStep(self.device, graphs)
        self.compiled: CompiledRegions | None = None
        self._install(data)
        self._precompute(data)
        for extension in self.extensions:  # in list order: see the extensions module
            extension.install(self, data)
        self.pretrained_projections = None  # copied into the processors: not kept
        if self.frozen_dtype is not None:  # after every set-up encode: those stay float32
            self.components.vae.to(self.frozen_dtype)
        if config.train.compile == "regional":  # after every copy of the UNet (RRA's reference)
            self.compiled = compile_regions(
                self.components.unet, self.components.text_encoder,
                *(network for extension in self.extensions for network in extension.networks()))
        params = self.trainable_parameters()
        cuda = self.device.type == "cuda"
        train_settings = self.train
        self.optimizer = torch.optim.AdamW(
            params, lr=train_settings.learning_rate,
            betas=(train_settings.adam_beta1, train_settings.adam_beta2),
            weight_decay=train_settings.weight_decay, eps=train_settings.adam_epsilon,
            fused=cuda, capturable=cuda)  # capturable: the step count stays on the device

    # ------------------------------------------------------------------ set-up
    def _install(self, data: ConceptData) -> None:
        """The placeholder token and its learned vectors; the models on the device."""
        components = self.components
        train_settings = self.train
        self.token_id, initial = add_placeholder_token(
            components.tokenizer, components.text_encoder, train_settings.placeholder_token,
            train_settings.initializer_token.replace(CLASS_WORD, data.class_noun))
        components.to(self.device)
        # the trainable K/V copies start from these, whatever the frozen weights' dtype
        self.pretrained_projections = float32_projections(components.unet)
        if self.frozen_dtype is not None:  # before any processor (trainable) is installed
            components.text_encoder.to(self.frozen_dtype)  # table rows keep their values
            components.unet.to(self.frozen_dtype)
        self.embeddings = PlaceholderEmbeddings(
            initial, frequency_decomposed=self.method.fdte,
            band_init=self.config.frequency.band_init).to(self.device)
        self.embeddings.vectors.requires_grad_(self.method.train_token)
        self._handles.append(install_placeholder_embeddings(components.text_encoder,
                                                            self.token_id, self.embeddings))
        self.class_noun = data.class_noun

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The placeholder vectors (when the method learns them), then each extension's
        parameters (in list order)."""
        params = [self.embeddings.vectors] if self.method.train_token else []
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
        components, frequency = self.components, self.config.frequency
        images = data.images.to(self.device, torch.float32)
        pixel_masks = data.masks.to(self.device, torch.float32)
        if self.method.recipe.hflip:  # each photo's mirror joins the photos (drawn alike)
            images = torch.cat([images, images.flip(-1)])
            pixel_masks = torch.cat([pixel_masks, pixel_masks.flip(-1)])
        self.instance_count = images.shape[0]
        versions = {Band.FULL: images}
        if self.method.fdte:  # band images are fixed per concept image: filter once
            versions[Band.LOW] = frequency_band(images, Band.LOW, frequency)
            versions[Band.HIGH] = frequency_band(images, Band.HIGH, frequency)
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
        mask_settings = self.config.masks
        self.pixel_masks = pixel_masks
        self.latent_masks = latent_masks(pixel_masks, latent_side,
                                         iterations=mask_settings.dilation_iterations,
                                         kernel=mask_settings.dilation_kernel)
        use_prior = self.train.prior_batch > 0 and data.prior_images.shape[0] > 0
        self.prior_batch = self.train.prior_batch if use_prior else 0
        self.prior_latents = (self.encode_distribution(data.prior_images) if use_prior
                              else None)
        tokenizer = components.tokenizer
        prompt = INSTANCE_PROMPT.format(token=self.train.placeholder_token,
                                        class_noun=data.class_noun)
        self.instance_ids = tokenizer(prompt, padding="max_length", truncation=True,
                                      max_length=tokenizer.model_max_length,
                                      return_tensors="pt").input_ids.to(self.device)
        if not bool((self.instance_ids == self.token_id).any()):
            raise ValueError(f"the instance prompt {prompt!r} lost its placeholder to truncation")
        if use_prior:
            class_ids = tokenizer(CLASS_PROMPT.format(class_noun=data.class_noun),
                                  padding="max_length", truncation=True,
                                  max_length=tokenizer.model_max_length,
                                  return_tensors="pt").input_ids.to(self.device)
            with self._autocast():  # fixed: no placeholder
                self.class_states = components.text_encoder(class_ids)[0].float()

    def _autocast(self) -> torch.autocast:
        # no cast cache with graphs: cached casts would outlive the captured region
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                              enabled=self.amp_dtype is not None,
                              cache_enabled=self.graphed.mode == "off")

    # ------------------------------------------------------------------ the step
    def draw(self) -> StepDraws:
        """The host half's draws for the next step, from the CPU generator.

        The draw order is fixed (a resumed run replays it bit-identically): instance photo
        indices, bands, one latent ε per instance row, prior indices, prior latent ε, noise,
        timesteps; then each extension's own (stateless) draws, in list order.
        """
        generator = self.generator
        bi, bp = self.train.instance_batch, self.prior_batch
        instance_indices = torch.randint(self.instance_count, (bi,), generator=generator)
        bands = (sample_bands(bi, self.config.frequency, generator) if self.method.fdte
                 else (Band.FULL,) * bi)
        shape = self.instance_latents[Band.FULL][0].shape[1:]
        eps = [torch.randn((1, *shape), generator=generator) for _ in range(bi)]
        prior_indices = torch.empty(0, dtype=torch.long)
        if bp:
            prior_indices = torch.randint(self.prior_latents[0].shape[0], (bp,),
                                          generator=generator)
            eps.append(torch.randn((bp, *shape), generator=generator))
        noise = torch.randn((bi + bp, *shape), generator=generator)
        timesteps = torch.randint(self.components.noise_scheduler.config.num_train_timesteps,
                                  (bi + bp,), generator=generator)
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
                if self.graphed.captured:
                    raise RuntimeError(f"step input {name!r} changed shape or dtype after the "
                                       "CUDA graph was captured")
                buffer = self._inputs[name] = torch.empty_like(tensor, device=self.device)
            source = tensor.pin_memory() if self.device.type == "cuda" else tensor
            buffer.copy_(source, non_blocking=True)

    def _device_batch(self) -> StepBatch:
        """The step's latents, noising and masks, computed on the device from the buffers."""
        inputs = self._inputs
        bi, bp = self.train.instance_batch, self.prior_batch
        indices, slots, eps = inputs["instance_indices"], inputs["band_slots"], inputs["latent_eps"]
        latents = self._band_means[slots, indices] + self._band_stds[slots, indices] * eps[:bi]
        if bp:
            mean, std = self.prior_latents
            prior = inputs["prior_indices"]
            latents = torch.cat([latents, mean[prior] + std[prior] * eps[bi:]])
        noise, timesteps = inputs["noise"], inputs["timesteps"]
        scheduler = self.components.noise_scheduler
        masks = self.latent_masks[indices]
        if masked_noising_on(self.method):
            noisy_inst = masked_noising(latents[:bi], noise[:bi], timesteps[:bi], masks,
                                        scheduler)
        else:
            noisy_inst = scheduler.add_noise(latents[:bi], noise[:bi], timesteps[:bi])
        noisy = torch.cat([noisy_inst, scheduler.add_noise(latents[bi:], noise[bi:],
                                                           timesteps[bi:])])
        extension_draws = {name: inputs[name] for name in inputs if name not in STEP_INPUTS}
        return StepBatch(indices, timesteps, noise, noisy, masks,
                         encoder_states=torch.empty(0), instance_count=bi,
                         prior_indices=inputs["prior_indices"], draws=extension_draws)

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
        losses = self._forward_backward(1.0)
        self._update()
        return losses

    def _forward_backward(self, scale: float) -> tuple[tuple[str, ...], Tensor]:
        """Forward and losses of the buffered micro-batch; its gradient, × ``scale``, is added
        to the parameters' gradients."""
        components = self.components
        batch = self._device_batch()
        bi = batch.instance_count
        mix = self._band_mixes[self._inputs["band_slots"]]
        with self._autocast():
            with self.embeddings.mixing(mix):
                instance_states = components.text_encoder(self.instance_ids.expand(bi, -1))[0]
            states = instance_states
            if self.prior_batch:
                states = torch.cat([instance_states, self.class_states.to(states.dtype)
                                    .expand(self.prior_batch, -1, -1)])
            batch.encoder_states = states
            for extension in self.extensions:
                extension.before_unet(batch)
            pred = components.unet(batch.noisy_latents, batch.timesteps, states).sample.float()
        target = self._targets(batch).float()
        if self.method.instance_loss == "mse":  # the baselines' scripts
            parts = {"inst": F.mse_loss(pred[:bi], target[:bi])}
        else:
            mask = batch.latent_masks if masked_loss_on(self.method) else None
            parts = {"inst": masked_diffusion_loss(
                pred[:bi], target[:bi], mask,
                normalisation=self.config.losses.instance_normalisation)}
        if self.prior_batch:
            parts["prior"] = prior_preservation_loss(pred[bi:], target[bi:])
        for extension in self.extensions:
            parts.update(extension.loss_terms(batch))
        losses = total_loss(parts, self.config.losses)
        (losses.total * scale if scale != 1.0 else losses.total).backward()
        return losses.stacked()

    def _update(self) -> None:
        """Clip the summed gradients, step the optimizer, clear the gradients."""
        torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for extension in self.extensions:
            extension.after_step()

    @property
    def graph_captured(self) -> bool:
        """Whether steps now replay a captured CUDA graph."""
        return self.graphed.captured

    def train_step(self) -> StepResult:
        """One optimizer step: ``train.gradient_accumulation`` micro-batches, each drawn and
        run in turn (their gradients summed, each × 1/accumulation), then one update. The
        logged losses are the micro-batches' mean."""
        accumulation = self.train.gradient_accumulation
        if accumulation == 1:
            draws = self.draw()
            self._upload(draws)
            with compiled_calls(self.compiled, "train.compile"):
                names, values = self.graphed.run(self._device_step, self.optimizer)
            bands = draws.bands
        else:
            micro_values, bands = [], ()
            with compiled_calls(self.compiled, "train.compile"):
                for _ in range(accumulation):
                    draws = self.draw()
                    self._upload(draws)
                    names, micro = self._forward_backward(1.0 / accumulation)
                    micro_values.append(micro)
                    bands += draws.bands
                self._update()
            values = torch.stack(micro_values).mean(dim=0)
        self.step += 1
        self._pending_losses.append((names, values))
        return StepResult(self.step, self.total_steps, names, values, bands)

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
        """The placeholder vectors, then each extension's tensors, by concept-file name."""
        tensors = self.embeddings.learned_tensors()
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
        shapes = {name: tuple(t.shape) for name, t in self.learned_tensors().items()}
        found = {name: tuple(t.shape) for name, t in learned.items()}
        if found != shapes:  # copying in would broadcast a wrong shape without a word
            odd = sorted(n for n in shapes.keys() | found.keys() if shapes.get(n) != found.get(n))
            raise ValueError(f"the checkpoint's learned tensors are not this training's (names "
                             f"or shapes differ: {odd[:3]})")
        with torch.no_grad():
            self.embeddings.vectors.copy_(learned["eqdiff_token.vectors"])
        for extension in self.extensions:
            extension.load_learned_tensors(learned)
        # the optimizer gets new state tensors, which a captured graph would not see: drop it
        # (a new one is captured after the warm-up steps)
        self.graphed.drop()
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])
        self._logged = list(state["loss_history"])
        self._pending_losses = []

    def remove(self) -> None:
        """Uninstall hooks and processors: the base model is as it was loaded (plus the token)."""
        self.graphed.drop()
        if self.compiled is not None:
            self.compiled.remove()
        for extension in reversed(self.extensions):
            extension.remove()
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []
