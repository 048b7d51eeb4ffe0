"""The offline model zoo: models built here from configs, saved like the real ones.

Nothing can be downloaded on our machines, so tests and the demo use small random models of
the same classes as the real ones, written with ``save_pretrained`` and read back through the
same loaders users take for real weights:

- :func:`build_tiny_sd` — a Stable Diffusion 1.x pipeline with diffusers' test shapes (VAE
  scale factor 2) and the **real CLIP BPE tokenizer** (49,408 tokens, SD-1.x ids), rebuilt from
  the vocabulary file that ships inside open_clip_torch.
- :func:`sd15_shaped_components` — random modules with SD-1.5's exact shapes, for speed and
  memory work (never saved: 4 GB of noise).
- :func:`build_tiny_clip` and :func:`build_tiny_dino` — evaluation models of the open_clip and
  ViT (DINO) families.
"""

from __future__ import annotations

import gzip
import json
import logging
import shutil
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from eqdiff.models import SDComponents

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408
CLIP_BOS_ID = 49406
CLIP_EOS_ID = 49407
CLIP_MAX_LENGTH = 77

# SD-1.x noise schedule (scaled-linear betas, epsilon prediction).
SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "num_train_timesteps": 1000}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable-unicode table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _clip_bpe_file() -> Path:
    """The BPE vocabulary inside the installed open_clip package (found, not imported)."""
    from importlib.util import find_spec

    spec = find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed: it ships CLIP's vocabulary")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_torch ships no BPE vocabulary at {path}")
    return path


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    with gzip.open(_clip_bpe_file()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    # vocabulary = 256 byte symbols + their 256 word-final forms + merges + 2 special tokens
    merges = lines[1:1 + CLIP_VOCAB_SIZE - 2 * 256 - 2]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != CLIP_VOCAB_SIZE:
        raise ValueError(f"rebuilt CLIP vocabulary has {len(tokens)} tokens, expected "
                         f"{CLIP_VOCAB_SIZE}")
    return {token: i for i, token in enumerate(tokens)}, merges


def save_clip_tokenizer(folder: str | Path) -> CLIPTokenizer:
    """Write CLIP's BPE tokenizer (the one SD-1.x uses) to ``folder`` and load it back."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                              model_max_length=CLIP_MAX_LENGTH, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    return CLIPTokenizer.from_pretrained(folder)


def _tiny_text_encoder(seed: int) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=CLIP_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=5, num_attention_heads=4,
                            max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=32,
                            bos_token_id=CLIP_BOS_ID, eos_token_id=CLIP_EOS_ID,
                            pad_token_id=CLIP_EOS_ID, hidden_act="quick_gelu")
    return CLIPTextModel(config)


def _tiny_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32)


def _tiny_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
        sample_size=64, norm_num_groups=32)


def tiny_sd_pipeline(tokenizer_folder: str | Path, *, seed: int = 0) -> StableDiffusionPipeline:
    """A tiny random SD-1.x pipeline in memory (64 px images, 32 px latents).

    The same seed always gives the same weights; the tokenizer is written to
    ``tokenizer_folder``.
    """
    return StableDiffusionPipeline(
        vae=_tiny_vae(seed), text_encoder=_tiny_text_encoder(seed + 1),
        tokenizer=save_clip_tokenizer(tokenizer_folder), unet=_tiny_unet(seed + 2),
        scheduler=PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, steps_offset=1,
                                set_alpha_to_one=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_tiny_sd(folder: str | Path, *, seed: int = 0) -> Path:
    """Build :func:`tiny_sd_pipeline` and save it in the standard diffusers layout.

    The folder loads with :func:`eqdiff.models.load_sd_components` or
    ``StableDiffusionPipeline.from_pretrained``.
    """
    folder = Path(folder)
    tiny_sd_pipeline(folder / "tokenizer", seed=seed).save_pretrained(
        folder, safe_serialization=True)
    logger.info("wrote tiny SD pipeline to %s", folder)
    return folder


def sd15_shaped_components(*, device: torch.device | str = "cpu",
                           dtype: torch.dtype = torch.float32, seed: int = 0) -> SDComponents:
    """Random modules with SD-1.5's exact shapes (860M UNet, ViT-L/14 text tower, 8× VAE).

    Built in memory for speed and memory measurements; timing does not depend on the values.
    """
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2).to(dtype)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            sample_size=512).to(dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=CLIP_VOCAB_SIZE, hidden_size=768, intermediate_size=3072,
            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=CLIP_MAX_LENGTH,
            projection_dim=768, hidden_act="quick_gelu", bos_token_id=CLIP_BOS_ID,
            eos_token_id=CLIP_EOS_ID, pad_token_id=CLIP_EOS_ID)).to(dtype)
    tokenizer = CLIPTokenizer.from_pretrained(_tokenizer_cache())
    return SDComponents(tokenizer, text_encoder, vae, unet, DDPMScheduler(**SD_SCHEDULE),
                        source="sd15-shaped-random")


@lru_cache(maxsize=1)
def _tokenizer_cache() -> str:
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="eqdiff-clip-tokenizer-"))
    save_clip_tokenizer(folder)
    return str(folder)


# --------------------------------------------------------------------------- evaluation models

TINY_CLIP_NAME = "eqdiff-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32,
                   "head_width": 32},
    "text_cfg": {"context_length": CLIP_MAX_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 32,
                 "heads": 2, "layers": 2},
    "quick_gelu": True,
}


def build_tiny_clip(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny random open_clip model saved in open_clip's hub layout.

    ``folder`` receives ``open_clip_config.json`` (model config + preprocessing) and
    ``open_clip_model.safetensors``; load it as ``open_clip.create_model_and_transforms(
    "local-dir:" + folder)`` or through the project's CLIP scorer.
    """
    import open_clip
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**{k: v for k, v in TINY_CLIP_CONFIG.items()})
    config = {"model_cfg": TINY_CLIP_CONFIG,
              "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                                 "std": list(open_clip.OPENAI_DATASET_STD),
                                 "interpolation": "bicubic", "resize_mode": "shortest"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / "open_clip_model.safetensors")
    return folder


def build_tiny_dino(folder: str | Path, *, seed: int = 0) -> Path:
    """A tiny random ViT of DINO ViT-S/16's family (16 px patches, CLS token), saved with
    ``save_pretrained``; load with ``transformers.ViTModel.from_pretrained(folder)``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    folder = Path(folder)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(image_size=224, patch_size=16, hidden_size=32,
                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                               qkv_bias=True), add_pooling_layer=False)
    model.save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                      do_center_crop=True, resample=3).save_pretrained(folder)
    return folder


def build_zoo(root: str | Path) -> dict[str, Path]:
    """Build every tiny offline model under ``root`` (skipping ones already there).

    Returns the folders by role: ``base`` (tiny SD), ``clip``, ``dino``.
    """
    root = Path(root)
    builders = {"base": (root / "tiny-sd", build_tiny_sd, "model_index.json"),
                "clip": (root / "tiny-clip", build_tiny_clip, "open_clip_model.safetensors"),
                "dino": (root / "tiny-dino", build_tiny_dino, "model.safetensors")}
    built = {}
    for role, (folder, build, marker) in builders.items():
        if not (folder / marker).is_file():
            staging = folder.with_name(folder.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            build(staging)
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)  # a half-built model is never visible under its name
        built[role] = folder
    return built
