"""Loading Stable Diffusion 1.x components from a local folder, a hub id or a single file.

Every loader goes through the same ``from_pretrained`` path whether the weights are real
(SD-1.5 from the hub cache or a folder) or the tiny offline models of :mod:`eqdiff.fixtures.zoo`.
Weights are only read from safetensors: pickled checkpoints are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from eqdiff.config import ALLOW_DOWNLOADS

if TYPE_CHECKING:  # diffusers and transformers are imported where models are built: naming,
    # checking and hashing a model (a run's plan) loads neither
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        SchedulerMixin,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)


class _EmptyFloat32ListFilter(logging.Filter):
    """Drops diffusers' warning that "modules … should be kept in float32: []".

    diffusers (0.42) prints it on every ``.to(dtype)`` of a model even when the list of such
    modules is empty, i.e. when the cast is exactly right; every Ray worker repeated it. Any
    warning that names modules still gets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


logging.getLogger("diffusers.models.modeling_utils").addFilter(_EmptyFloat32ListFilter())

SD_SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class ModelLoadError(ValueError):
    """A base model could not be loaded; the message says which path or id and what to check."""


@dataclass
class SDComponents:
    """The parts of a Stable Diffusion 1.x model that customization needs."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    source: str

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel, derived from the VAE (8 for SD-1.x, 2 for the tiny model)."""
        return vae_scale_factor(self.vae)

    def latent_size(self, resolution: int) -> int:
        if resolution % self.vae_scale_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the VAE's scale "
                             f"factor {self.vae_scale_factor}")
        return resolution // self.vae_scale_factor

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SDComponents:
        for module in (self.text_encoder, self.vae, self.unet):
            module.to(device=device, dtype=dtype)
        return self

    def freeze(self) -> SDComponents:
        """Frozen, eval-mode modules: the customization methods add their own trainable tensors."""
        for module in (self.text_encoder, self.vae, self.unet):
            module.requires_grad_(False)
            module.eval()
        return self

    def pipeline(self, scheduler: SchedulerMixin) -> StableDiffusionPipeline:
        """These modules (shared, not copied) as a plain diffusers pipeline with ``scheduler``."""
        return sd_pipeline(self.vae, self.text_encoder, self.tokenizer, self.unet, scheduler)


def sd_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                unet: UNet2DConditionModel, scheduler: SchedulerMixin
                ) -> StableDiffusionPipeline:
    """A standard text-to-image pipeline from its parts, without safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` keeps every Hugging Face library off the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _locate(source: str) -> str:
    """A diffusers folder (checked for its subfolders) or a hub id, from ``source``; a missing
    folder or a pickled checkpoint is a :class:`ModelLoadError`."""
    expanded = Path(source).expanduser()
    if expanded.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{source}: pickled checkpoints are not loaded (they can run code); "
                             "convert it to .safetensors or give a diffusers folder")
    if expanded.is_dir():
        missing = [s for s in SD_SUBFOLDERS if not (expanded / s).is_dir()]
        if missing:
            raise ModelLoadError(f"{expanded} is not a diffusers Stable Diffusion folder: missing "
                                 f"subfolder(s) {missing}")
        return str(expanded)
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise ModelLoadError(f"base model folder {expanded} does not exist")
    return source


def downloads_off(local_files_only: bool) -> str:
    """Why nothing was downloaded, and how to allow it (for errors)."""
    return (f"downloads are off: {ALLOW_DOWNLOADS}" if local_files_only
            else "downloads are off (HF_HUB_OFFLINE is set)")


def check_base_model(source: str, *, local_files_only: bool = True,
                     resolution: int | None = None) -> None:
    """Fail fast, without loading weights, for a base model that cannot load: a missing or
    incomplete folder, a pickled checkpoint, a missing single file, or (offline) a hub id that
    is not in the local Hugging Face cache.

    With ``resolution`` (the run's image size), a model whose native resolution, read from its
    configs, is at least twice as large or at most half as large gets a warning."""
    source = str(source)
    expanded = Path(source).expanduser()
    if expanded.suffix == ".safetensors":
        if not expanded.is_file():
            raise ModelLoadError(f"single-file checkpoint {expanded} does not exist")
        return
    location = _locate(source)
    if not Path(location).is_dir() and (local_files_only or hub_offline()):  # a hub id
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(source, "unet/config.json"), str):
            raise ModelLoadError(f"base model {source!r} is not in the local Hugging Face "
                                 f"cache and {downloads_off(local_files_only)}, or give a "
                                 "local folder")
    native = native_resolution(location)
    if resolution is not None and native is not None and not native / 2 < resolution < 2 * native:
        logger.warning("base model %s makes %d px images but the run uses %d px: set "
                       "train.resolution and sample.resolution to %d (config overrides, e.g. "
                       "{train.resolution: %d, sample.resolution: %d})", source, native,
                       resolution, native, native, native)


def native_resolution(location: str) -> int | None:
    """The image size a diffusers model folder (or a hub id in the local cache) was made for:
    the UNet's ``sample_size`` times the VAE's scale factor, read from the configs without
    loading weights; None when the configs are not at hand or do not say."""
    from huggingface_hub import try_to_load_from_cache

    configs = {}
    for part in ("unet", "vae"):
        file = (Path(location) / part / "config.json" if Path(location).is_dir()
                else try_to_load_from_cache(location, f"{part}/config.json"))
        if not isinstance(file, (str, Path)) or not Path(file).is_file():
            return None
        configs[part] = json.loads(Path(file).read_text("utf-8"))
    sample_size = configs["unet"].get("sample_size")
    blocks = configs["vae"].get("block_out_channels")
    if not isinstance(sample_size, int) or not blocks:
        return None
    return sample_size * 2 ** (len(blocks) - 1)


def load_sd_components(source: str, *, revision: str | None = None,
                       local_files_only: bool = True, config_folder: str | None = None,
                       torch_dtype: torch.dtype | None = None) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and the DDPM training scheduler.

    ``source`` is a diffusers-layout folder, a hub id (``org/name``; read from the local
    Hugging Face cache when ``local_files_only``, the default, or ``HF_HUB_OFFLINE=1``), or a
    single ``.safetensors`` checkpoint (then ``config_folder`` names a diffusers folder or hub
    id holding the component configs, since nothing may be fetched).
    """
    source = str(source)
    expanded = Path(source).expanduser()
    if expanded.suffix == ".safetensors":
        return _load_single_file(expanded, config_folder=config_folder,
                                 local_files_only=local_files_only, torch_dtype=torch_dtype)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    location = _locate(source)
    offline = local_files_only or hub_offline()
    kwargs: dict[str, Any] = {"local_files_only": offline}
    if revision:
        kwargs["revision"] = revision
    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder="tokenizer", **kwargs)
        text_encoder = CLIPTextModel.from_pretrained(
            location, subfolder="text_encoder", use_safetensors=True, dtype=torch_dtype,
            **kwargs)
        vae = AutoencoderKL.from_pretrained(location, subfolder="vae", use_safetensors=True,
                                            torch_dtype=torch_dtype, **kwargs)
        unet = UNet2DConditionModel.from_pretrained(location, subfolder="unet",
                                                    use_safetensors=True,
                                                    torch_dtype=torch_dtype, **kwargs)
        scheduler = DDPMScheduler.from_pretrained(location, subfolder="scheduler", **kwargs)
    except (OSError, ValueError) as err:
        hint = (f"it is not in the local Hugging Face cache and "
                f"{downloads_off(local_files_only)}" if offline and location == source
                else "check the id, the revision and your network or HF token")
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load base model {source!r}: {hint} ({first_line})"
                             ) from err
    logger.info("loaded base model %s (unet %.0fM params)", source,
                sum(p.numel() for p in unet.parameters()) / 1e6)
    return SDComponents(tokenizer, text_encoder, vae, unet, scheduler, source)


def _load_single_file(path: Path, *, config_folder: str | None, local_files_only: bool,
                      torch_dtype: torch.dtype | None) -> SDComponents:
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    if not path.is_file():
        raise ModelLoadError(f"single-file checkpoint {path} does not exist")
    if config_folder is None:
        raise ModelLoadError(f"{path}: a single-file checkpoint needs config_folder (a diffusers "
                             "folder or hub id with the SD-1.x component configs)")
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=config_folder, local_files_only=local_files_only or hub_offline(),
            torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load single-file checkpoint {path}: {err}") from err
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return SDComponents(pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet, scheduler,
                        str(path))


LOCAL_DIR_SCHEME = "local-dir:"  # open_clip's prefix for a model folder


def model_identity(source: str) -> str:
    """A short stable name for a model, for cache keys and concept compatibility checks.

    A hub id stays as it is; a local folder (or file; open_clip's ``local-dir:`` prefix is
    understood) is named by its name plus a hash of its configs and a sample of every weights
    file (size, first and last MiB), so two different local models never share a name, and
    weights replaced in place change it, without reading gigabytes. Covers diffusers folders
    (``unet/…``) and single-model folders (``config.json`` + ``model.safetensors``).
    """
    path = Path(source.removeprefix(LOCAL_DIR_SCHEME)).expanduser()
    if not source or not path.exists():
        return source
    digest = hashlib.sha256()
    for sub in ("unet/config.json", "text_encoder/config.json", "vae/config.json",
                "config.json", "open_clip_config.json"):
        file = path / sub
        if file.is_file():
            digest.update(file.read_bytes())
    weights_files = ([path] if path.is_file()
                     else sorted([*path.glob("*.safetensors"), *path.glob("*/*.safetensors")]))
    for weights in weights_files:
        digest.update(_weights_fingerprint(weights))
    return f"{path.name}-{digest.hexdigest()[:12]}"


def _weights_fingerprint(file: Path, sample: int = 1 << 20) -> bytes:
    size = file.stat().st_size
    with file.open("rb") as handle:
        head = handle.read(sample)
        handle.seek(max(size - sample, 0))
        tail = handle.read(sample)
    return f"{file.name}:{size}:".encode() + hashlib.sha256(head + tail).digest()
