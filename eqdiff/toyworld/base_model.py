"""The toy world's base text-to-image model: an SD-1.x pipeline trained from scratch here.

Same classes and layout as Stable Diffusion 1.x — ``AutoencoderKL`` (scale factor 2: 32 px
images, 16×16×4 latents), a CLIP text encoder with the real BPE tokenizer, a
``UNet2DConditionModel`` with cross-attention at 8×8 and 4×4, SD's scaled-linear noise schedule
and ε-prediction — so the whole customization path runs on it unchanged. It is small enough to
train on two CPU cores within an hour and to commit (≤ 10 MB: the UNet and VAE are stored in
float16, the text encoder in float32 because transformers keeps a checkpoint's dtype and
``StableDiffusionPipeline`` would then mix dtypes; diffusers loads float16 files as float32).

Training (:func:`train_base_model`) is two stages on a fixed rendered corpus:

1. the VAE: reconstruction (MSE) plus a small KL term; the latent scaling factor is then set so
   that latents have unit variance, as SD's 0.18215 does;
2. the text encoder and UNet together, on latents encoded once, with 10 % empty captions for
   classifier-free guidance and an exponential moving average of the weights (the EMA weights
   are the ones saved). The ε-loss is weighted twice: per sample by Min-SNR-γ (Hang et al.,
   2023; diffusers' ``--snr_gamma``), which stops the easy low-noise steps from dominating, and
   per latent pixel by the object's mask (``1 + object_loss_weight`` on the object, 1 on the
   background), because a model this small otherwise spends itself on backgrounds and styles,
   which cover most pixels, and never learns shapes and colours.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from eqdiff.toyworld.world import DEFAULT_SIZE, caption, random_object, random_scene, render
from eqdiff.zoo import (
    CLIP_BOS_ID,
    CLIP_EOS_ID,
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    SD_SCHEDULE,
    save_clip_tokenizer,
)

logger = logging.getLogger(__name__)

TEXT_WIDTH = 32


@dataclass(frozen=True)
class BaseTrainConfig:
    """Everything that decides the trained weights (recorded in the model card)."""

    seed: int = 0
    corpus_size: int = 20_000
    image_size: int = DEFAULT_SIZE
    batch_size: int = 64
    vae_steps: int = 500
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    unet_steps: int = 4_000
    unet_lr: float = 1e-3
    text_lr: float = 5e-4
    warmup_steps: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    snr_gamma: float = 5.0  # Min-SNR-γ loss weighting; 0 turns it off
    object_loss_weight: float = 2.0  # extra ε-loss weight on the object's latent pixels
    threads: int = 2  # use 1 on a busy machine: two threads stall in OpenMP barriers there
    log_every: int = 50  # steps per loss-log entry (means over the window)


def toy_text_encoder() -> CLIPTextModel:
    """CLIP text transformer, 4 layers of width 32, over CLIP's full 49,408-token vocabulary."""
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
        num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=TEXT_WIDTH, bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID,
        pad_token_id=CLIP_EOS_ID, hidden_act="quick_gelu"))


def toy_unet(image_size: int = DEFAULT_SIZE) -> UNet2DConditionModel:
    """A three-level UNet (32/48/64 channels) with cross-attention at the two lower levels."""
    return UNet2DConditionModel(
        sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 48, 64), norm_num_groups=16, cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))


def toy_vae(image_size: int = DEFAULT_SIZE) -> AutoencoderKL:
    """A two-level KL autoencoder: 3×32×32 images ↔ 4×16×16 latents."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
        layers_per_block=1, norm_num_groups=8, sample_size=image_size,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


# --------------------------------------------------------------------------- corpus

@dataclass
class Corpus:
    """Rendered training images (uint8, N×H×W×3), object masks (uint8, N×H×W) and captions."""

    images: np.ndarray
    masks: np.ndarray
    captions: list[str]


def render_corpus(count: int, *, seed: int, size: int = DEFAULT_SIZE,
                  progress: Callable[[int], None] | None = None) -> Corpus:
    """``count`` random scenes of non-novel objects, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.empty((count, size, size), dtype=np.uint8)
    captions = []
    for i in range(count):
        obj, scene = random_object(rng), random_scene(rng)
        image, mask = render(obj, scene, size=size)
        images[i], masks[i] = np.asarray(image), np.asarray(mask)
        captions.append(caption(obj, scene))
        if progress is not None and (i + 1) % 1000 == 0:
            progress(i + 1)
    return Corpus(images, masks, captions)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- stages

def train_vae(corpus: Corpus, cfg: BaseTrainConfig) -> tuple[AutoencoderKL, list[dict]]:
    """Train the autoencoder; returns it (with its latent scaling factor set) and the loss log."""
    torch.manual_seed(cfg.seed)
    vae = toy_vae(cfg.image_size)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: _lr_factor(s, cfg.warmup_steps // 2, cfg.vae_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    log, running = [], []
    started = time.perf_counter()
    for step in range(cfg.vae_steps):
        index = torch.randint(len(corpus.images), (cfg.batch_size,), generator=generator)
        pixels = _to_tensor(corpus.images[index.numpy()])
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        mse = F.mse_loss(recon, pixels)
        loss = mse + cfg.vae_kl_weight * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        running.append(mse.item())
        if (step + 1) % cfg.log_every == 0:
            log.append({"step": step + 1, "mse": float(np.mean(running)),
                        "seconds": round(time.perf_counter() - started, 1)})
            logger.info("vae step %d/%d: mse %.4f", step + 1, cfg.vae_steps, log[-1]["mse"])
            running = []
    vae.eval()
    with torch.no_grad():
        sample = _to_tensor(corpus.images[:2048])
        std = float(vae.encode(sample).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae, log


@torch.no_grad()
def encode_corpus(vae: AutoencoderKL, corpus: Corpus, *, batch: int = 256) -> torch.Tensor:
    """Posterior means of every corpus image, scaled by the VAE's scaling factor."""
    chunks = [vae.encode(_to_tensor(corpus.images[i:i + batch])).latent_dist.mean
              for i in range(0, len(corpus.images), batch)]
    return torch.cat(chunks) * vae.config.scaling_factor


def latent_loss_weights(masks: np.ndarray, latent_size: int, object_weight: float
                        ) -> torch.Tensor:
    """Per-latent-pixel loss weights (N×1×h×w): 1 on the background, ``1 + object_weight``
    on the object (the mask's area-average over each latent pixel's footprint)."""
    coverage = F.adaptive_avg_pool2d(torch.from_numpy(masks).float().div(255.0)[:, None],
                                     latent_size)
    return 1.0 + object_weight * coverage


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor,
                    gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights for ε-prediction: ``min(SNR, γ) / SNR`` (1 where ``gamma`` is 0)."""
    if gamma <= 0:
        return torch.ones(timesteps.shape, dtype=alphas_cumprod.dtype,
                          device=timesteps.device)
    a = alphas_cumprod[timesteps]
    snr = a / (1.0 - a)
    return snr.clamp(max=gamma) / snr


def denoising_loss(prediction: torch.Tensor, noise: torch.Tensor, pixel_weights: torch.Tensor,
                   sample_weights: torch.Tensor) -> torch.Tensor:
    """The weighted ε-loss: each sample's squared error averaged with ``pixel_weights``
    (normalised per sample, so uniform weights give the plain mean), then scaled by
    ``sample_weights`` and averaged over the batch."""
    squared = (prediction - noise).square()
    per_sample = ((squared * pixel_weights).mean(dim=(1, 2, 3))
                  / pixel_weights.expand_as(squared).mean(dim=(1, 2, 3)))
    return (per_sample * sample_weights).mean()


def _tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    return tokenizer(texts, padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True,
                     return_tensors="pt").input_ids


def train_denoiser(latents: torch.Tensor, weights: torch.Tensor, captions: list[str],
                   tokenizer: CLIPTokenizer, cfg: BaseTrainConfig
                   ) -> tuple[CLIPTextModel, UNet2DConditionModel, list[dict]]:
    """Train text encoder and UNet together; return their EMA copies and the loss log.

    ``weights`` are the per-latent-pixel loss weights (:func:`latent_loss_weights`). The log
    records the weighted loss that is optimised and the plain ε-MSE beside it."""
    torch.manual_seed(cfg.seed + 1)
    text_encoder, unet = toy_text_encoder(), toy_unet(cfg.image_size)
    ema_text, ema_unet = toy_text_encoder(), toy_unet(cfg.image_size)
    ema_text.load_state_dict(text_encoder.state_dict())
    ema_unet.load_state_dict(unet.state_dict())
    noise_scheduler = DDPMScheduler(**SD_SCHEDULE)
    alphas = noise_scheduler.alphas_cumprod
    ids = _tokenize(tokenizer, captions)
    empty = _tokenize(tokenizer, [""])[0]
    optimiser = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": cfg.unet_lr},
        {"params": text_encoder.parameters(), "lr": cfg.text_lr}], weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: _lr_factor(s, cfg.warmup_steps, cfg.unet_steps))
    generator = torch.Generator().manual_seed(cfg.seed + 2)
    pairs = [(list(text_encoder.parameters()), list(ema_text.parameters())),
             (list(unet.parameters()), list(ema_unet.parameters()))]
    log, running, plain = [], [], []
    started = time.perf_counter()
    for step in range(cfg.unet_steps):
        index = torch.randint(len(latents), (cfg.batch_size,), generator=generator)
        x0 = latents[index]
        tokens = ids[index].clone()
        drop = torch.rand(cfg.batch_size, generator=generator) < cfg.caption_dropout
        tokens[drop] = empty
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, len(alphas), (cfg.batch_size,), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        states = text_encoder(tokens).last_hidden_state
        prediction = unet(noisy, t, states).sample
        loss = denoising_loss(prediction, noise, weights[index],
                              min_snr_weights(alphas, t, cfg.snr_gamma))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(text_encoder.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for live, averaged in pairs:
                torch._foreach_lerp_(averaged, live, 1.0 - decay)
        running.append(loss.item())
        plain.append(F.mse_loss(prediction.detach(), noise).item())
        if (step + 1) % cfg.log_every == 0:
            log.append({"step": step + 1, "loss": float(np.mean(running)),
                        "mse": float(np.mean(plain)),
                        "seconds": round(time.perf_counter() - started, 1)})
            elapsed = time.perf_counter() - started
            logger.info("unet step %d/%d: loss %.4f, ε-mse %.4f (%.0f s, ~%.0f s left)",
                        step + 1, cfg.unet_steps, log[-1]["loss"], log[-1]["mse"], elapsed,
                        elapsed / (step + 1) * (cfg.unet_steps - step - 1))
            running, plain = [], []
    return ema_text.eval(), ema_unet.eval(), log


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel,
                      tokenizer: CLIPTokenizer, unet: UNet2DConditionModel
                      ) -> StableDiffusionPipeline:
    """The trained parts as a standard pipeline (PNDM sampler, SD's schedule)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1,
                                set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_base_model(pipeline: StableDiffusionPipeline, folder: str | Path) -> Path:
    """Save in the diffusers layout: UNet and VAE as float16, the text encoder as float32."""
    folder = Path(folder)
    pipeline.unet.to(torch.float16)
    pipeline.vae.to(torch.float16)
    try:
        pipeline.save_pretrained(folder, safe_serialization=True)
    finally:
        pipeline.unet.to(torch.float32)
        pipeline.vae.to(torch.float32)
    return folder


def train_base_model(out: str | Path, cfg: BaseTrainConfig = BaseTrainConfig()) -> dict:
    """Render the corpus, train VAE then text encoder + UNet, save to ``out``.

    Returns the training record (config, timings, loss logs), also written to
    ``out/training.json``.
    """
    torch.set_num_threads(cfg.threads)
    torch.set_flush_denormal(True)  # a guard: subnormal floats are slow on many CPUs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.perf_counter()
    corpus = render_corpus(cfg.corpus_size, seed=cfg.seed, size=cfg.image_size,
                           progress=lambda n: logger.info("rendered %d/%d", n, cfg.corpus_size))
    timings["render_s"] = round(time.perf_counter() - started, 1)
    mark = time.perf_counter()
    vae, vae_log = train_vae(corpus, cfg)
    timings["vae_s"] = round(time.perf_counter() - mark, 1)
    mark = time.perf_counter()
    latents = encode_corpus(vae, corpus)
    tokenizer = save_clip_tokenizer(out / "tokenizer")
    weights = latent_loss_weights(corpus.masks, latents.shape[-1], cfg.object_loss_weight)
    text_encoder, unet, unet_log = train_denoiser(latents, weights, corpus.captions, tokenizer,
                                                  cfg)
    timings["denoiser_s"] = round(time.perf_counter() - mark, 1)
    save_base_model(assemble_pipeline(vae, text_encoder, tokenizer, unet), out)
    timings["total_s"] = round(time.perf_counter() - started, 1)
    record = {"config": asdict(cfg), "timings": timings, "vae_log": vae_log,
              "denoiser_log": unet_log, "torch": torch.__version__,
              "latent_scaling_factor": vae.config.scaling_factor}
    (out / "training.json").write_text(json.dumps(record, indent=1))
    logger.info("base model written to %s in %.0f s", out, timings["total_s"])
    return record
