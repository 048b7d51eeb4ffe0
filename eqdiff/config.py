"""Run configuration: frozen dataclasses for every concern of docs/method.md.

Every section validates itself in ``__post_init__`` and raises ``ValueError`` naming the bad
field and value. ``to_dict``/``from_dict`` round-trip through JSON (unknown keys are errors),
and :func:`config_hash` gives a stable content hash of the fields that change results; fields
that only change speed or bookkeeping carry ``metadata={"hash": False}`` and are left out.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

FilterShape = Literal["box", "gaussian", "butterworth"]
BandOutput = Literal["real", "abs"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
FrozenWeights = Literal["auto", "as-loaded"]
CudaGraphs = Literal["auto", "on", "off"]
Compile = Literal["off", "regional"]
ReferenceChoice = Literal["other", "same"]
MaskExtractorName = Literal["grabcut", "provided", "alpha", "grounded-sam", "clipseg", "full"]
SchedulerName = Literal["ddim", "ddpm", "pndm", "euler", "euler-ancestral", "dpm-solver++", "unipc"]
RRABlock = Literal["down", "mid", "up"]
MGDPParts = Literal["noising-and-loss", "loss-only", "noising-only"]
InstanceLoss = Literal["eqdiff", "mse"]
BandInit = Literal["each-full", "half"]
ReferencePrompt = Literal["initial-row", "learned"]
GateGradient = Literal["inside", "straight-through"]
RRALossForm = Literal["released", "per-layer"]
InstanceNormalisation = Literal["released", "per-element"]

T = TypeVar("T")


def _not_hashed(default: Any) -> Any:
    """A field that does not change results (speed, bookkeeping): left out of the hash."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in frozen configs")
    return field(default=default, metadata={"hash": False})


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_fraction(name: str, value: float, *, open_low: bool = True) -> None:
    low_ok = value > 0 if open_low else value >= 0
    _check(low_ok and value <= 1 and math.isfinite(value), f"{name} must be in "
           f"{'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")


def _check_literal(name: str, value: Any, allowed: Any) -> None:
    options = typing.get_args(allowed)
    _check(value in options, f"{name} must be one of {list(options)}, got {value!r}")


@dataclass(frozen=True)
class FrequencyConfig:
    """Frequency decomposition of concept images (docs/method.md §2).

    Cutoffs are fractions of the half-spectrum (1.0 = Nyquist), so they scale with resolution:
    the released 50 and 5 bins at 512 px are 50/256 and 5/256.
    """

    low_cutoff: float = 50 / 256  # the low-pass band keeps |u|,|v| below this
    high_cutoff: float = 5 / 256  # the high-pass band removes |u|,|v| below this
    filter_shape: FilterShape = "box"
    butterworth_order: int = 2
    p_low: float = 0.1
    p_high: float = 0.1
    p_full: float = 0.8
    grayscale_bands: bool = True
    band_output: BandOutput = "real"
    # where S_LF and S_HF start: each at the initializer's embedding e (the released code; the
    # full-band token S_LF + S_HF then starts at 2e), or each at e / 2 (it starts at e, like a
    # single-vector method's token) (docs/method.md §3)
    band_init: BandInit = "each-full"

    def __post_init__(self) -> None:
        _check_fraction("frequency.low_cutoff", self.low_cutoff)
        _check_fraction("frequency.high_cutoff", self.high_cutoff)
        _check(self.high_cutoff < self.low_cutoff,
               f"frequency cutoffs are inverted: high_cutoff ({self.high_cutoff}) must be below "
               f"low_cutoff ({self.low_cutoff})")
        _check_literal("frequency.filter_shape", self.filter_shape, FilterShape)
        _check_literal("frequency.band_output", self.band_output, BandOutput)
        _check_literal("frequency.band_init", self.band_init, BandInit)
        _check(self.butterworth_order >= 1,
               f"frequency.butterworth_order must be >= 1, got {self.butterworth_order}")
        for name in ("p_low", "p_high", "p_full"):
            _check_fraction(f"frequency.{name}", getattr(self, name), open_low=False)
        total = self.p_low + self.p_high + self.p_full
        _check(abs(total - 1.0) < 1e-6,
               f"frequency band probabilities must sum to 1, got p_low+p_high+p_full = {total:g}")


@dataclass(frozen=True)
class MaskConfig:
    """Subject masks for the mask-guided diffusion process (docs/method.md §4)."""

    extractor: MaskExtractorName = "grabcut"
    fallback: MaskExtractorName = "full"
    # a mask covering less of its image than this (an empty one always) is passed over: the
    # fallback extractor is tried, then the full mask. A subject photographed for customisation
    # fills far more of the frame; an extractor that failed returns nothing or a speck. 2 % is
    # also a little more than one latent cell at 64 px (an 8x VAE: 1/64 of the image)
    min_coverage: float = 0.02
    dilation_iterations: int = 5
    dilation_kernel: int = 5
    clipseg_threshold: float = 0.4
    segmentation_model: str = ""  # local path or hub id for grounded-sam / clipseg
    detector_model: str = ""  # Grounding DINO for grounded-sam

    def __post_init__(self) -> None:
        _check_literal("masks.extractor", self.extractor, MaskExtractorName)
        _check_literal("masks.fallback", self.fallback, MaskExtractorName)
        _check(0 <= self.min_coverage < 1,
               f"masks.min_coverage must be in [0, 1), got {self.min_coverage!r}")
        _check(self.dilation_iterations >= 0,
               f"masks.dilation_iterations must be >= 0, got {self.dilation_iterations}")
        _check(self.dilation_kernel >= 1 and self.dilation_kernel % 2 == 1,
               f"masks.dilation_kernel must be a positive odd number, got {self.dilation_kernel}")
        _check_fraction("masks.clipseg_threshold", self.clipseg_threshold)


@dataclass(frozen=True)
class RRAConfig:
    """Residual reference attention (docs/method.md §5)."""

    blocks: tuple[RRABlock, ...] = ("mid", "up")
    timestep_gap: int = 2
    reference: ReferenceChoice = "other"  # training reference: another photo, or the same one
    inference_caption: str = "a {class_noun}"
    # what the reference UNet is conditioned on in training: the instance prompt with the
    # placeholder's initial table row (released), or each row's prompt states with the learned
    # vectors injected, detached (docs/method.md §5)
    reference_prompt: ReferencePrompt = "initial-row"
    # the gradient of the clamped gate m: 1 on [0, 1] and 0 outside ("inside"), or 1 everywhere
    # ("straight-through"; the forward pass clamps either way) (docs/method.md §5)
    gate_gradient: GateGradient = "straight-through"

    def __post_init__(self) -> None:
        _check(len(self.blocks) > 0, "rra.blocks must name at least one of down/mid/up")
        for block in self.blocks:
            _check_literal("rra.blocks[]", block, RRABlock)
        _check(len(set(self.blocks)) == len(self.blocks), f"rra.blocks repeats: {self.blocks}")
        _check(self.timestep_gap >= 0, f"rra.timestep_gap must be >= 0, got {self.timestep_gap}")
        _check_literal("rra.reference", self.reference, ReferenceChoice)
        _check(bool(self.inference_caption.strip()), "rra.inference_caption must not be empty")
        _check_literal("rra.reference_prompt", self.reference_prompt, ReferencePrompt)
        _check_literal("rra.gate_gradient", self.gate_gradient, GateGradient)


@dataclass(frozen=True)
class LossConfig:
    """Loss weights (docs/method.md §4, §6):
    L = L_inst + prior·L_prior + xattn·L_xattn + rra·L_rra."""

    prior_weight: float = 1.0
    xattn_weight: float = 0.1
    rra_weight: float = 0.1
    xattn_resolution: int = 16
    # the RRA loss: heads and 16x16 up-block layers pooled first, mean over every query
    # ("released"), or per head and layer, over in-mask queries ("per-layer") (docs/method.md §6)
    rra_loss_form: RRALossForm = "released"
    # a masked instance loss divided by the mask area ("released": C times the per-element
    # mean of C latent channels) or by the masked element count ("per-element") (§4)
    instance_normalisation: InstanceNormalisation = "released"

    def __post_init__(self) -> None:
        for name in ("prior_weight", "xattn_weight", "rra_weight"):
            value = getattr(self, name)
            _check(value >= 0 and math.isfinite(value),
                   f"losses.{name} must be a finite number >= 0, got {value!r}")
        _check(self.xattn_resolution >= 1,
               f"losses.xattn_resolution must be >= 1, got {self.xattn_resolution}")
        _check_literal("losses.rra_loss_form", self.rra_loss_form, RRALossForm)
        _check_literal("losses.instance_normalisation", self.instance_normalisation,
                       InstanceNormalisation)


CLASS_WORD = "{class_noun}"  # an initializer that stands for the subject's class word


@dataclass(frozen=True)
class RecipeConfig:
    """A method's own training recipe (docs/method.md §8): steps, batch, learning rate and its
    scaling, initializer word. Each preset carries its published recipe; a run file or the UI
    form changes it per method, and a ``train.*`` field set for the run (not null) applies to
    every method over its recipe.

    The learning rate is scaled like diffusers' ``--scale_lr`` when ``scale_learning_rate``:
    × instance rows × accumulation steps, × 2 when the step has prior rows (Custom Diffusion's
    script doubles it for prior preservation), e.g. 1e-5 × 2 × 1 × 2 = 4e-5.
    """

    steps: int = 600
    instance_batch: int = 2
    prior_batch: int = 2  # class-prior rows per step, with prior preservation
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    learning_rate: float = 1e-5
    scale_learning_rate: bool = True
    initializer: str = "ktn"  # the word the token starts from; "{class_noun}": the class word
    hflip: bool = False  # instance images flipped left-right at random (p = 0.5 per row)
    lora_rank: int = 4  # methods with a UNet LoRA

    def __post_init__(self) -> None:
        for name in ("steps", "instance_batch", "gradient_accumulation", "lora_rank"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                   f"recipe.{name} must be a positive integer, got {value!r}")
        _check(isinstance(self.prior_batch, int) and self.prior_batch >= 0,
               f"recipe.prior_batch must be an integer >= 0, got {self.prior_batch!r}")
        _check(self.learning_rate > 0 and math.isfinite(self.learning_rate),
               f"recipe.learning_rate must be > 0, got {self.learning_rate!r}")
        _check(bool(self.initializer.strip()), "recipe.initializer must not be empty")


@dataclass(frozen=True)
class MethodConfig:
    """Which parts of EqDiff are on, and the method's training recipe. Named presets are in
    :data:`METHOD_PRESETS`."""

    name: str = "eqdiff"
    fdte: bool = True  # two frequency embeddings (LF, HF) on band images; else one embedding
    mgdp: bool = True  # mask-guided noising and loss
    # which halves of MGDP are on: the paper's both; "loss-only" noises the whole latent as
    # plain diffusion does and learns only inside the mask; "noising-only" keeps the clean
    # background but takes the loss everywhere (docs/method.md §4)
    mgdp_parts: MGDPParts = "noising-and-loss"
    # "eqdiff": the instance loss normalised as losses.instance_normalisation says (masked
    # under MGDP); "mse": the plain mean squared error of the baselines' own scripts
    instance_loss: InstanceLoss = "eqdiff"
    rra: bool = True  # residual reference attention
    train_kv: bool = True  # Custom-Diffusion K/V copies in cross-attention
    xattn_loss: bool = True
    rra_loss: bool = True
    prior_preservation: bool = True
    train_token: bool = True  # learn the placeholder's vectors (off: it keeps its initial word)
    unet_lora: bool = False  # LoRA on the UNet's attention projections (DreamBooth-LoRA)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and self.name.replace("-", "").replace("_", "").isalnum(),
               f"method.name must be letters, digits, '-' or '_', got {self.name!r}")
        _check(not (self.rra_loss and not self.rra),
               f"method {self.name!r}: rra_loss needs rra=True")
        _check_literal(f"method {self.name!r}: mgdp_parts", self.mgdp_parts, MGDPParts)
        _check_literal(f"method {self.name!r}: instance_loss", self.instance_loss, InstanceLoss)
        _check(not (self.mgdp and self.instance_loss == "mse"),
               f"method {self.name!r}: MGDP's masked loss needs instance_loss='eqdiff'")
        _check(not (self.fdte and not self.train_token),
               f"method {self.name!r}: fdte learns the token's band vectors; it needs "
               "train_token=True")
        _check(self.train_token or self.train_kv or self.rra or self.unet_lora,
               f"method {self.name!r} trains nothing: turn on train_token, train_kv, rra or "
               "unet_lora")


def masked_noising_on(method: MethodConfig) -> bool:
    """Whether ``method`` keeps the background clean while noising the subject (MGDP)."""
    return method.mgdp and method.mgdp_parts != "loss-only"


def masked_loss_on(method: MethodConfig) -> bool:
    """Whether ``method`` takes the instance loss inside the subject mask only (MGDP)."""
    return method.mgdp and method.mgdp_parts != "noising-only"


_BASELINE = {"fdte": False, "mgdp": False, "rra": False, "xattn_loss": False, "rra_loss": False,
             "instance_loss": "mse"}

METHOD_PRESETS: dict[str, MethodConfig] = {
    # docs/method.md §7: the released settings (600 steps, 2 + 2, 1e-5 scaled to 4e-5, "ktn")
    "eqdiff": MethodConfig(name="eqdiff"),
    "eqdiff-no-fdte": MethodConfig(name="eqdiff-no-fdte", fdte=False),
    "eqdiff-no-mgdp": MethodConfig(name="eqdiff-no-mgdp", mgdp=False),
    "eqdiff-no-rra": MethodConfig(name="eqdiff-no-rra", rra=False, rra_loss=False),
    # docs/method.md §8: the baselines' published recipes (diffusers' example scripts)
    "custom-diffusion": MethodConfig(
        name="custom-diffusion", **_BASELINE,
        recipe=RecipeConfig(steps=250, instance_batch=2, prior_batch=2, learning_rate=1e-5,
                            hflip=True)),
    "textual-inversion": MethodConfig(
        name="textual-inversion", **_BASELINE, train_kv=False, prior_preservation=False,
        recipe=RecipeConfig(steps=3000, instance_batch=1, prior_batch=0,
                            gradient_accumulation=4, learning_rate=5e-4,
                            initializer=CLASS_WORD)),
    "dreambooth-lora": MethodConfig(
        name="dreambooth-lora", **_BASELINE, train_kv=False, train_token=False, unet_lora=True,
        recipe=RecipeConfig(steps=500, instance_batch=1, prior_batch=1, learning_rate=1e-4,
                            scale_learning_rate=False, initializer="sks", lora_rank=4)),
}


def method_preset(name: str) -> MethodConfig:
    """The named method preset; a clear error lists the known names."""
    try:
        return METHOD_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHOD_PRESETS)}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Customization training (docs/method.md §7).

    The fields that default to ``None`` come from each method's recipe (:class:`RecipeConfig`);
    set here, they apply to every method of the run. :meth:`RunConfig.training` gives the
    settings one method trains with, every field filled in.
    """

    steps: int | None = None
    instance_batch: int | None = None
    prior_batch: int | None = None
    gradient_accumulation: int | None = None
    # the rate the optimizer uses, not scaled (a recipe's rate is scaled by its batch)
    learning_rate: float | None = None
    initializer_token: str | None = None  # "{class_noun}": the subject's class word
    # every recipe's steps and learning rate × these (a smaller model than SD-1.5, a shorter
    # benchmark), so the methods keep their recipes' ratios; a rate or count set above is kept
    steps_scale: float = 1.0
    learning_rate_scale: float = 1.0
    num_prior_images: int = 200
    prior_seed: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    grad_clip: float = 1.0
    resolution: int = 512
    placeholder_token: str = "<eqd>"
    seed: int = 0
    precision: Precision = _not_hashed("auto")
    # "auto": frozen modules (UNet, VAE, text transformer) held in bf16 when autocast is bf16
    # (cast once at set-up); "as-loaded": leave them in the dtype they were loaded in
    frozen_weights: FrozenWeights = _not_hashed("auto")
    # CUDA only: capture the training step as a CUDA graph after a few eager steps ("auto":
    # fall back to eager steps if the capture fails; "on": fail instead; "off": always eager)
    cuda_graphs: CudaGraphs = _not_hashed("auto")
    # "regional": torch.compile the UNet's and text encoder's repeated blocks (eqdiff/
    # compilation.py). The first step compiles (minutes with a cold inductor cache, far less
    # from the cache a previous run on this machine left); off until measured to pay
    compile: Compile = _not_hashed("off")
    checkpoint_every: int = _not_hashed(100)
    validation_every: int = _not_hashed(0)  # 0: no validation images

    def __post_init__(self) -> None:
        for name in ("steps", "instance_batch", "gradient_accumulation", "num_prior_images",
                     "resolution"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and not isinstance(value, bool)
                                     and value >= 1),
                   f"train.{name} must be a positive integer, got {value!r}")
        for name in ("prior_batch", "checkpoint_every", "validation_every", "seed", "prior_seed"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 0),
                   f"train.{name} must be an integer >= 0, got {value!r}")
        _check(self.resolution % 8 == 0,
               f"train.resolution must be a multiple of 8, got {self.resolution}")
        _check(self.learning_rate is None
               or (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
                   and math.isfinite(self.learning_rate)),
               f"train.learning_rate must be > 0, got {self.learning_rate!r}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _check(0 <= value < 1, f"train.{name} must be in [0, 1), got {value!r}")
        for name in ("steps_scale", "learning_rate_scale"):
            value = getattr(self, name)
            _check(value > 0 and math.isfinite(value), f"train.{name} must be > 0, got {value!r}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.adam_epsilon > 0, f"train.adam_epsilon must be > 0, got {self.adam_epsilon}")
        _check(self.grad_clip > 0, f"train.grad_clip must be > 0, got {self.grad_clip}")
        _check_literal("train.precision", self.precision, Precision)
        _check_literal("train.frozen_weights", self.frozen_weights, FrozenWeights)
        _check_literal("train.cuda_graphs", self.cuda_graphs, CudaGraphs)
        _check_literal("train.compile", self.compile, Compile)
        _check(self.placeholder_token.strip() == self.placeholder_token
               and " " not in self.placeholder_token and self.placeholder_token,
               f"train.placeholder_token must be one word, got {self.placeholder_token!r}")
        _check(self.initializer_token is None or bool(str(self.initializer_token).strip()),
               "train.initializer_token must not be empty")


@dataclass(frozen=True)
class SampleConfig:
    """Generation for evaluation (docs/method.md §7: DDIM 50, eta 0, CFG 7.5, negative prompt
    "")."""

    scheduler: SchedulerName = "ddim"
    steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0
    negative_prompt: str = ""
    images_per_prompt: int = 4
    seed: int = 0
    resolution: int = 512
    batch_size: int = _not_hashed(8)
    # CUDA only: replay the UNet calls of the denoising loop (reference pass and main pass) as
    # CUDA graphs, captured once per shape and concept ("auto": eager if a capture fails).
    # Off by default until the graphed images have been checked on a GPU
    # (tests/method/test_cuda_graphs.py, -m gpu) and the speed measured
    # (bench/sampling_throughput.py).
    cuda_graphs: CudaGraphs = _not_hashed("off")
    # "regional": torch.compile the UNets' blocks, the reference UNet's and the VAE decoder's
    # included (eqdiff/method/compilation.py); the first batch compiles. Off until measured to pay
    compile: Compile = _not_hashed("off")

    def __post_init__(self) -> None:
        _check_literal("sample.scheduler", self.scheduler, SchedulerName)
        _check_literal("sample.cuda_graphs", self.cuda_graphs, CudaGraphs)
        _check_literal("sample.compile", self.compile, Compile)
        for name in ("steps", "images_per_prompt", "batch_size", "resolution"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1,
                   f"sample.{name} must be a positive integer, got {value!r}")
        _check(self.guidance_scale >= 1.0,
               f"sample.guidance_scale must be >= 1 (1 disables CFG), got {self.guidance_scale}")
        _check(0.0 <= self.eta <= 1.0, f"sample.eta must be in [0, 1], got {self.eta}")
        _check(self.seed >= 0, f"sample.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation models (docs/evaluation.md). Each is a local path or a hub id."""

    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "openai"  # open_clip tag, or a local weights file / folder
    dino_model: str = "facebook/dino-vits16"
    batch_size: int = _not_hashed(32)

    def __post_init__(self) -> None:
        _check(bool(self.clip_model), "eval.clip_model must not be empty")
        _check(bool(self.dino_model), "eval.dino_model must not be empty")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.batch_size}")


# How a run is allowed to download weights; every model load (base model, scorers, learned
# mask extractors) reads only local files and the local Hugging Face cache unless it is given.
ALLOW_DOWNLOADS = ("allow downloads with the override model.local_files_only=false (eqdiff "
                   "run --set model.local_files_only=false)")


@dataclass(frozen=True)
class ModelConfig:
    """The base text-to-image model: a local diffusers folder, a hub id or a single file.

    ``local_files_only`` (on by default) keeps every model of the run (base model, scorers,
    learned mask extractors) to local folders and the local Hugging Face cache: the one switch
    that allows downloads is setting it false (:data:`ALLOW_DOWNLOADS`)."""

    base_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str = ""
    local_files_only: bool = _not_hashed(True)

    def __post_init__(self) -> None:
        _check(bool(self.base_model.strip()), "model.base_model must not be empty")


@dataclass(frozen=True)
class StorageConfig:
    """Where artifacts go: a local folder (default), ``file:///…`` or ``s3://bucket/prefix``."""

    url: str = _not_hashed("./artifacts")
    endpoint_url: str = _not_hashed("")
    region: str = _not_hashed("")
    cache_dir: str = _not_hashed("")  # local cache for S3 reads; default under the user cache
    # S3 only: every request gets up to max_attempts tries on transient errors, each bounded by
    # the connect and read timeouts; no new try starts that could end after deadline_s
    max_attempts: int = _not_hashed(6)
    connect_timeout_s: float = _not_hashed(5.0)
    read_timeout_s: float = _not_hashed(30.0)
    deadline_s: float = _not_hashed(120.0)
    # a local folder that every node of a cluster mounts at the same path (NFS and the like)
    shared: bool = _not_hashed(False)

    def __post_init__(self) -> None:
        _check(bool(self.url), "storage.url must not be empty")
        scheme = self.url.split("://", 1)[0] if "://" in self.url else ""
        _check(scheme in ("", "file", "s3"),
               f"storage.url scheme must be file:// or s3:// (or a plain path), got {self.url!r}")
        _check(not self.endpoint_url or self.endpoint_url.startswith(("http://", "https://")),
               f"storage.endpoint_url must start with http:// or https://, got "
               f"{self.endpoint_url!r}")
        _check(self.max_attempts >= 1, f"storage.max_attempts must be >= 1, got "
               f"{self.max_attempts}")
        for name in ("connect_timeout_s", "read_timeout_s", "deadline_s"):
            value = getattr(self, name)
            _check(value > 0 and math.isfinite(value),
                   f"storage.{name} must be a positive number of seconds, got {value!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one customization run needs, section by section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    methods: tuple[MethodConfig, ...] = (METHOD_PRESETS["eqdiff"],)
    frequency: FrequencyConfig = field(default_factory=FrequencyConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    rra: RRAConfig = field(default_factory=RRAConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _check(len(self.methods) > 0, "methods must name at least one method")
        names = [m.name for m in self.methods]
        _check(len(set(names)) == len(names), f"methods repeat a name: {names}")

    def training(self, method: MethodConfig) -> TrainConfig:
        """The training settings of ``method``: its recipe, under the ``train.*`` fields this
        run sets for every method; every field filled in (the learning rate scaled)."""
        train, recipe = self.train, method.recipe

        def chosen(name: str, recipe_value: Any) -> Any:
            value = getattr(train, name)
            return recipe_value if value is None else value

        prior_batch = chosen("prior_batch", recipe.prior_batch)
        settings = dataclasses.replace(
            train, steps=chosen("steps", max(1, round(recipe.steps * train.steps_scale))),
            instance_batch=chosen("instance_batch", recipe.instance_batch),
            prior_batch=prior_batch if method.prior_preservation else 0,
            gradient_accumulation=chosen("gradient_accumulation",
                                         recipe.gradient_accumulation),
            initializer_token=chosen("initializer_token", recipe.initializer))
        if train.learning_rate is not None:
            return dataclasses.replace(settings, learning_rate=float(train.learning_rate))
        rate = recipe.learning_rate * train.learning_rate_scale
        if recipe.scale_learning_rate:
            rate *= settings.instance_batch * settings.gradient_accumulation
            rate *= 2 if settings.prior_batch else 1
        return dataclasses.replace(settings, learning_rate=rate)

    def method(self, name: str) -> MethodConfig:
        for method in self.methods:
            if method.name == name:
                return method
        known = [m.name for m in self.methods]
        raise ValueError(f"method {name!r} is not in this run; the run has {known}")


# --------------------------------------------------------------------------- serialisation

def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (tuples become lists)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"expected a config dataclass, got {type(config).__name__}")
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(annotation: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
        return from_dict(annotation, value, where=where)
    if origin is tuple:
        args = typing.get_args(annotation)
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item_type = args[0]
        return tuple(_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        return value
    if origin in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value is None or len(options) != 1:
            return value
        return _coerce(options[0], value, where)  # an optional field: X | None
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        if not ok:
            raise ValueError(f"{where} must be {annotation.__name__}, got {value!r}")
    return value


def method_from(value: Any, where: str = "method") -> MethodConfig:
    """Methods may be given by preset name, as a full mapping, or as a mapping with a
    ``preset`` key and the fields it changes (``{"preset": "textual-inversion", "recipe":
    {"steps": 1000}}``; a changed preset keeps its name unless ``name`` is given)."""
    if isinstance(value, str):
        return method_preset(value)
    if isinstance(value, dict) and "preset" in value:
        changes = dict(value)
        base = to_dict(method_preset(str(changes.pop("preset"))))
        recipe = changes.pop("recipe", {})
        if not isinstance(recipe, dict):
            raise ValueError(f"{where}.recipe must be a mapping, got {recipe!r}")
        unknown = sorted(set(recipe) - set(base["recipe"]))
        if unknown:
            raise ValueError(f"unknown config key(s) {[f'{where}.recipe.' + k for k in unknown]}"
                             f"; known: {sorted(base['recipe'])}")
        merged = {**base, **changes, "recipe": {**base["recipe"], **recipe}}
        return _coerce(MethodConfig, merged, where)
    return _coerce(MethodConfig, value, where)


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build ``cls`` from a dict such as :func:`to_dict` returns. Unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ValueError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                         f"known: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        sub = f"{where}.{name}" if where else name
        if cls is RunConfig and name == "methods":
            if isinstance(value, str) or not isinstance(value, (list, tuple)):
                raise ValueError(f"methods must be a list, got {value!r}")
            kwargs[name] = tuple(method_from(v, f"methods[{i}]") for i, v in enumerate(value))
        else:
            kwargs[name] = _coerce(hints[name], value, sub)
    return cls(**kwargs)


def to_json(config: Any) -> str:
    return json.dumps(to_dict(config), indent=2, sort_keys=True)


def from_json(cls: type[T], text: str) -> T:
    return from_dict(cls, json.loads(text))


def with_overrides(config: T, overrides: dict[str, Any]) -> T:
    """A copy of ``config`` with dotted-key overrides, e.g. ``{"train.steps": 50}``."""
    data = to_dict(config)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(_unknown_key(dotted, data))
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ValueError(_unknown_key(dotted, data))
        node[parts[-1]] = value
    return from_dict(type(config), data)


def _dotted_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for name, value in data.items():
        keys.append(prefix + name)
        if isinstance(value, dict):
            keys += _dotted_keys(value, f"{prefix}{name}.")
    return keys


def _unknown_key(dotted: str, data: dict[str, Any]) -> str:
    """``unknown config key 'x'``, with the closest known keys when some are close."""
    close = difflib.get_close_matches(dotted, _dotted_keys(data), n=3, cutoff=0.75)
    hint = f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""
    return f"unknown config key {dotted!r}{hint}"


# --------------------------------------------------------------------------- hashing

def _hashable_view(config: Any) -> Any:
    if dataclasses.is_dataclass(config):
        return {f.name: _hashable_view(getattr(config, f.name))
                for f in dataclasses.fields(config) if f.metadata.get("hash", True)}
    if isinstance(config, (list, tuple)):
        return [_hashable_view(v) for v in config]
    if isinstance(config, float):
        return repr(config)  # exact, stable across platforms
    return config


def config_hash(*parts: Any, length: int = 16) -> str:
    """A stable content hash of config sections (and plain JSON values) that change results.

    Fields marked ``metadata={"hash": False}`` (batch sizes for inference, checkpoint
    intervals, storage location) do not change the hash.
    """
    payload = json.dumps([_hashable_view(p) for p in parts], sort_keys=True,
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]
