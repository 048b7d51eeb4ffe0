"""Generation for evaluation: one base model loaded once, many concepts (docs/method.md §5, §7).

:class:`ConceptGenerator` holds one set of SD-1.x components and serves many
``(concept, requests)`` calls. A concept is applied for one call (token row, K/V weights, its
UNet LoRA and, when it has them, RRA processors with the reference pass) and removed
afterwards, so switching concepts never reloads the base model.

The denoising loop is written here (it equals ``StableDiffusionPipeline.__call__`` for the
same generators when no RRA is involved; a test holds it to that) because RRA needs a hook per
step: the frozen reference UNet runs once per denoising step on one clean reference latent
(VAE mean, not noised) at the current timestep with a plain class caption, and its bank serves
every image of the batch and both CFG branches (broadcast, not copied).

On CUDA with ``sample.cuda_graphs`` on, the two UNet calls of a step are captured once per
shape as CUDA graphs and replayed: each call is a function of its tensor inputs only (the
reference pass returns its bank entries; the main pass takes them as inputs), so a replay on
copied inputs computes what the eager call computes. Graphs live for one concept's call, as
its weights do. With ``sample.compile`` the UNets' and the VAE decoder's blocks run as
``torch.compile``d regions (:mod:`eqdiff.method.compilation`), compiled at the first batch.

Seeds are derived per (subject, prompt index, k) by :func:`image_seed`, independent of the
method, so methods are compared on identical initial noise. Noise is drawn with one CPU
generator per image, so an image does not depend on how requests are batched.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from eqdiff.config import RRAConfig, SampleConfig, SchedulerName
from eqdiff.method.attention import ProcessorHandle
from eqdiff.method.compilation import CompiledRegions, compile_regions, compiled_calls
from eqdiff.method.concept import Concept, ConceptHandle, apply_without_rra, check_base_model
from eqdiff.method.models import SDComponents, load_sd_components, model_identity
from eqdiff.method.reference import (
    RRA_PREFIX,
    ReferenceBank,
    frozen_reference_unet,
    install_reference_writers,
    install_rra,
    load_rra_tensors,
    rra_layers_of,
)

logger = logging.getLogger(__name__)

SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "unipc": (UniPCMultistepScheduler, {}),
}


# What StableDiffusionPipeline enforces on any SD-1.x scheduler config: latents are not in
# [-1, 1] (no x0 clipping) and timesteps are offset by one.
SD_SCHEDULER_FIXES = {"clip_sample": False, "steps_offset": 1}


def make_scheduler(name: SchedulerName, base_config: Mapping[str, Any]) -> SchedulerMixin:
    """A diffusers scheduler of kind ``name`` on the base model's noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known: {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(base_config, **SD_SCHEDULER_FIXES, **overrides)


def image_seed(base_seed: int, subject: str, prompt_index: int, k: int) -> int:
    """The seed of image ``k`` of prompt ``prompt_index`` for ``subject``: the first 63 bits of
    sha256("{base_seed}/{subject}/{prompt_index}/{k}"). No method in it: every method sees the
    same noise for the same image slot."""
    digest = hashlib.sha256(f"{base_seed}/{subject}/{prompt_index}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class ImageRequest:
    """One image to draw: its prompt, its seed, and its slot (prompt index, k) for the record."""

    prompt: str
    seed: int
    prompt_index: int = 0
    k: int = 0


def plan_requests(subject: str, prompts: Sequence[str], images_per_prompt: int,
                  base_seed: int) -> list[ImageRequest]:
    """``images_per_prompt`` requests per prompt, seeded by :func:`image_seed`."""
    return [ImageRequest(prompt, image_seed(base_seed, subject, i, k), i, k)
            for i, prompt in enumerate(prompts) for k in range(images_per_prompt)]


@dataclass
class GeneratedImage:
    """image: (3, H, W) float32 in [0, 1] on the CPU; record: what made it (JSON-ready)."""

    image: Tensor
    record: dict[str, Any]

    def save(self, path: str | Path) -> Path:
        return save_png_with_metadata(self.image, path, self.record)


def save_png_with_metadata(image: Tensor, path: str | Path,
                           metadata: Mapping[str, Any]) -> Path:
    """Write a (3, H, W) image in [0, 1] as an 8-bit PNG with one text chunk per metadata key
    (strings as they are, other values as JSON) plus ``eqdiff`` holding all of it as JSON."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("eqdiff", json.dumps(dict(metadata), sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.permute(1, 2, 0).numpy()).save(path, pnginfo=info)
    return path


def read_png_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata :func:`save_png_with_metadata` wrote (from the ``eqdiff`` chunk)."""
    with Image.open(path) as image:
        return json.loads(image.text["eqdiff"])


class CapturedCall:
    """``fn(*inputs)`` captured once as a CUDA graph, then replayed on copies of new inputs.

    ``fn`` must read nothing but its tensor inputs and tensors whose memory stays put (module
    weights), and return a tensor or a list of tensors. The returned tensors are the graph's
    own: the next replay overwrites them (clone what must outlive it).
    """

    WARMUP_CALLS = 2  # eager calls on a side stream before the capture, as CUDA graphs require

    def __init__(self, fn: Callable[..., Any], inputs: Sequence[Tensor]) -> None:
        device = inputs[0].device
        self.inputs = [tensor.clone() for tensor in inputs]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_CALLS):
                fn(*self.inputs)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn(*self.inputs)

    def __call__(self, *inputs: Tensor) -> Any:
        for static, value in zip(self.inputs, inputs, strict=True):
            static.copy_(value)
        self.graph.replay()
        return self.outputs


@dataclass
class _ActiveConcept:
    """A concept applied to the generator for one call, with what RRA needs per step."""

    concept: Concept
    weights: ConceptHandle | None = None
    rra: ProcessorHandle | None = None
    writers: ProcessorHandle | None = None
    reference_latent: Tensor | None = None  # (1, C, h, w) clean VAE mean
    reference_states: Tensor | None = None  # (1, L, D) caption states
    layers: list[str] = field(default_factory=list)  # RRA layers: the order of bank entries
    # the reference bank of each denoising step, kept for the later batches of the same call:
    # the reference pass depends only on the step, so it runs once per step per call
    banks: list[list[Tensor]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)

    def remove(self) -> None:
        for handle in (self.rra, self.writers, self.weights):
            if handle is not None:
                handle.remove()
        self.rra = self.writers = self.reference_latent = self.reference_states = None
        self.banks = []


class ConceptGenerator:
    """One base model, many (concept, requests) calls: see the module docstring.

    ``components`` are frozen and moved to ``device``/``dtype`` here; the generator owns them
    from now on (concepts are written into them for the length of a call).
    """

    def __init__(self, components: SDComponents, sample: SampleConfig = SampleConfig(),
                 rra: RRAConfig = RRAConfig(), *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> None:
        self.components = components.freeze().to(device, dtype)
        self.sample, self.rra_config = sample, rra
        self.device = torch.device(device)
        self.dtype = components.unet.dtype
        self.scheduler = make_scheduler(sample.scheduler, components.noise_scheduler.config)
        self.base_identity = model_identity(components.source)
        self.bank = ReferenceBank()
        # made while the UNet holds the base K/V: it keeps private copies of them
        self.reference_unet = frozen_reference_unet(components.unet)
        self.graph_mode = sample.cuda_graphs if self.device.type == "cuda" else "off"
        self.compiled: CompiledRegions | None = None
        if sample.compile == "regional":  # after the reference copy (it gets its own)
            self.compiled = compile_regions(self.components.unet, self.reference_unet,
                                            self.components.vae.decoder)
        self._graphs: dict[tuple, CapturedCall] = {}  # by call kind and input shapes

    @classmethod
    def from_pretrained(cls, source: str, sample: SampleConfig = SampleConfig(),
                        rra: RRAConfig = RRAConfig(), *, device: torch.device | str = "cpu",
                        dtype: torch.dtype | None = None,
                        local_files_only: bool = True) -> ConceptGenerator:
        components = load_sd_components(source, local_files_only=local_files_only,
                                        torch_dtype=dtype)
        return cls(components, sample, rra, device=device, dtype=dtype)

    # ------------------------------------------------------------------ concepts
    @torch.no_grad()
    def _encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """(n, L, D) text states, as ``StableDiffusionPipeline.encode_prompt`` computes them."""
        tokenizer, encoder = self.components.tokenizer, self.components.text_encoder
        ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        return encoder(ids.to(self.device))[0].to(encoder.dtype)

    @torch.no_grad()
    def _apply(self, concept: Concept, reference_image: Tensor | None) -> _ActiveConcept:
        has_rra = bool(concept.tensors_with_prefix(RRA_PREFIX))
        if has_rra and reference_image is None:
            raise ValueError(f"concept {concept.content_hash} has RRA weights: pass the "
                             "reference_image (3, H, W) in [-1, 1]")
        c = self.components
        check_base_model(concept, c.source)  # a concept for another model says so first
        active = _ActiveConcept(concept)
        try:
            if has_rra:  # before the LoRA: RRA's processors copy the projections it wraps
                names = rra_layers_of(concept.tensors)
                active.layers = names
                active.rra = install_rra(c.unet, self.bank, names)
                load_rra_tensors(active.rra, concept.tensors)
                for processor in active.rra.installed.values():
                    processor.to(self.dtype).requires_grad_(False)
                active.writers = install_reference_writers(self.reference_unet, self.bank,
                                                           names)
                active.reference_latent = self._reference_latent(reference_image)
                caption = self.rra_config.inference_caption.format(
                    class_noun=concept.record.get("class_noun", ""))
                active.reference_states = self._encode_prompts([caption])
            active.weights = apply_without_rra(c, concept, base_model=c.source)
        except Exception:
            active.remove()
            raise
        active.record = {"subject": concept.record.get("subject"),
                         "method": concept.record.get("method", {}).get("name"),
                         "concept_hash": concept.content_hash, "rra": has_rra}
        return active

    def _reference_latent(self, image: Tensor) -> Tensor:
        """(3, H, W) in [-1, 1] at the sampling resolution → (1, C, h, w) scaled VAE mean."""
        side = self.sample.resolution
        if image.shape != (3, side, side):
            raise ValueError(f"reference image must be (3, {side}, {side}) in [-1, 1], got "
                             f"{tuple(image.shape)}")
        vae = self.components.vae
        mean = vae.encode(image[None].to(self.device, vae.dtype)).latent_dist.mean
        return (mean * vae.config.scaling_factor).to(self.dtype)

    @contextmanager
    def applied(self, concept: Concept | None,
                reference_image: Tensor | None = None) -> Iterator[_ActiveConcept | None]:
        """Apply ``concept`` (None: the base model) within the block; remove it afterwards and
        release what it held."""
        active = self._apply(concept, reference_image) if concept is not None else None
        try:
            yield active
        finally:
            if active is not None:
                active.remove()
            self.bank.clear()
            self._graphs = {}  # captured with this concept's weights and processors
            if torch.cuda.is_initialized():
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ sampling
    def generate(self, concept: Concept | None, requests: Sequence[ImageRequest], *,
                 reference_image: Tensor | None = None, batch_size: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[GeneratedImage]:
        """Draw one image per request, ``batch_size`` (default ``sample.batch_size``) at a time.

        ``concept`` None draws from the base model. ``reference_image`` (3, H, W) in [-1, 1] at
        the sampling resolution is required for concepts with RRA weights; its reference pass
        runs once per denoising step for the whole call. ``progress(done, total)`` is called
        after each batch.
        """
        size = batch_size or self.sample.batch_size
        images: list[GeneratedImage] = []
        with (self.applied(concept, reference_image) as active,
              compiled_calls(self.compiled, "sample.compile")):
            for start in range(0, len(requests), size):
                chunk = list(requests[start:start + size])
                pixels = self._denoise(chunk, active,
                                       keep_banks=start + size < len(requests))
                s = self.sample
                for request, image in zip(chunk, pixels, strict=True):
                    record = {**(active.record if active else {"concept_hash": None,
                                                                "rra": False}),
                              "prompt": request.prompt, "seed": request.seed,
                              "prompt_index": request.prompt_index, "k": request.k,
                              "scheduler": s.scheduler, "steps": s.steps,
                              "guidance_scale": s.guidance_scale, "eta": s.eta,
                              "negative_prompt": s.negative_prompt,
                              "base_model": self.base_identity}
                    images.append(GeneratedImage(image, record))
                if progress is not None:
                    progress(len(images), len(requests))
        return images

    def _step_kwargs(self, generators: list[torch.Generator]) -> dict[str, Any]:
        accepted = inspect.signature(self.scheduler.step).parameters
        kwargs: dict[str, Any] = {}
        if "eta" in accepted:
            kwargs["eta"] = self.sample.eta
        if "generator" in accepted:
            kwargs["generator"] = generators
        return kwargs

    @torch.no_grad()
    def _denoise(self, requests: list[ImageRequest], active: _ActiveConcept | None, *,
                 keep_banks: bool = False) -> Tensor:
        """(n, 3, H, W) float32 images in [0, 1] on the CPU for these requests.

        ``keep_banks`` keeps each step's reference bank on ``active`` for later batches (at
        512 px in fp16 about 14 MB per step)."""
        c, s, scheduler = self.components, self.sample, self.scheduler
        n = len(requests)
        guided = s.guidance_scale > 1.0
        states = self._encode_prompts([r.prompt for r in requests])
        if guided:
            states = torch.cat([self._encode_prompts([s.negative_prompt] * n), states])
        generators = [torch.Generator().manual_seed(r.seed) for r in requests]
        side = c.latent_size(s.resolution)
        latents = randn_tensor((n, c.unet.config.in_channels, side, side), generator=generators,
                               device=self.device, dtype=states.dtype)
        scheduler.set_timesteps(s.steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generators)
        rra = active is not None and active.rra is not None
        layers = active.layers if rra else []
        for index, t in enumerate(scheduler.timesteps):
            entries: list[Tensor] = []
            if rra:  # one reference pass per step serves every image, both CFG branches and
                #      every later batch of this call (its bank is kept per step)
                if index < len(active.banks):
                    entries = active.banks[index]
                else:
                    entries = self._call("reference", self._reference_pass,
                                         active.reference_latent, t, active.reference_states,
                                         layers=layers)
                    if keep_banks:  # a graph's outputs are overwritten by its next replay
                        active.banks.append([entry.clone() for entry in entries]
                                            if self.graph_mode != "off" else entries)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self._call("unet", self._unet_pass, model_input, t, states, *entries,
                               layers=layers)
            if guided:
                uncond, text = noise.chunk(2)
                noise = uncond + s.guidance_scale * (text - uncond)
            latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        decoded = c.vae.decode(latents / c.vae.config.scaling_factor).sample
        return (decoded / 2 + 0.5).clamp(0, 1).float().cpu()

    def _reference_pass(self, latent: Tensor, t: Tensor, states: Tensor, *,
                        layers: Sequence[str]) -> list[Tensor]:
        """The reference UNet on the clean reference latent: its bank entries, in ``layers``
        order."""
        self.bank.clear()
        self.reference_unet(latent, t, states)
        entries = [self.bank.read(name) for name in layers]
        self.bank.clear()
        return entries

    def _unet_pass(self, sample: Tensor, t: Tensor, states: Tensor, *entries: Tensor,
                   layers: Sequence[str]) -> Tensor:
        """The (concept's) UNet's noise prediction, its RRA layers reading ``entries``."""
        self.bank.clear()
        for name, entry in zip(layers, entries, strict=True):
            self.bank.write(name, entry)
        noise = self.components.unet(sample, t, states).sample
        self.bank.clear()
        return noise

    def _call(self, kind: str, fn: Callable[..., Any], *inputs: Tensor,
              layers: Sequence[str]) -> Any:
        """``fn(*inputs, layers=layers)``, replayed from a CUDA graph per input shape when
        graphs are on (captured at the first call with that shape)."""
        def bound(*args: Tensor) -> Any:
            return fn(*args, layers=layers)

        if self.graph_mode == "off":
            return bound(*inputs)
        key = (kind, tuple(layers), *((tuple(x.shape), x.dtype) for x in inputs))
        call = self._graphs.get(key)
        if call is None:
            try:
                call = self._graphs[key] = CapturedCall(bound, inputs)
            except Exception as err:  # any capture failure: continue eagerly
                if self.graph_mode == "on":
                    raise
                self.graph_mode = "off"
                self._graphs = {}
                self.bank.clear()
                torch.cuda.synchronize(self.device)
                logger.warning("CUDA graph capture failed (%s: %s); sampling continues "
                               "without graphs", type(err).__name__, str(err).splitlines()[0])
                return bound(*inputs)
        return call(*inputs)
