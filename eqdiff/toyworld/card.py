"""The toy base model's model card: sample grids, the loss curve, and what it can draw.

:func:`sample_base_model` draws captioned samples through a plain
``StableDiffusionPipeline.from_pretrained`` (the path users take), :func:`class_style_grid`
lays them out, :func:`plot_losses` draws the training record's curves and
:func:`write_model_card` puts it all in ``README.md`` next to the weights.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from eqdiff.toyworld.world import (  # noqa: E402
    CLASSES,
    COLOURS,
    CONTEXTS,
    STYLES,
    ObjectSpec,
    SceneSpec,
    caption,
    random_object,
    random_scene,
    scene_grid,
)

logger = logging.getLogger(__name__)

CARD_GUIDANCE = 4.0
CARD_STEPS = 25


@dataclass(frozen=True)
class Sample:
    """A generated image with the attributes its caption asked for."""

    image: Image.Image
    obj: ObjectSpec
    scene: SceneSpec
    prompt: str


def load_pipeline(folder: str | Path) -> StableDiffusionPipeline:
    """The base model through the standard diffusers loader (float32, CPU)."""
    pipeline = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def draw(pipeline: StableDiffusionPipeline, specs: list[tuple[ObjectSpec, SceneSpec]], *,
         seed: int = 0, steps: int = CARD_STEPS, guidance: float = CARD_GUIDANCE,
         batch_size: int = 16) -> list[Sample]:
    """Draw one image per (object, scene) from its caption; seeded per image."""
    size = pipeline.unet.config.sample_size * (2 ** (len(pipeline.vae.config.block_out_channels)
                                                     - 1))
    samples = []
    for start in range(0, len(specs), batch_size):
        chunk = specs[start:start + batch_size]
        prompts = [caption(o, s) for o, s in chunk]
        generators = [torch.Generator().manual_seed(seed * 100_003 + start + i)
                      for i in range(len(chunk))]
        images = pipeline(prompts, num_inference_steps=steps, guidance_scale=guidance,
                          height=size, width=size, generator=generators).images
        samples += [Sample(im, o, s, p) for im, (o, s), p in zip(images, chunk, prompts,
                                                                  strict=True)]
    return samples


def class_style_specs(seed: int = 0, *, context: str | None = "plain"
                      ) -> list[tuple[ObjectSpec, SceneSpec]]:
    """One random (non-novel) object per class × style, rows by class."""
    rng = np.random.default_rng(seed)
    specs = []
    for shape in CLASSES:
        for style in STYLES:
            while True:
                obj = random_object(rng)
                if obj.shape == shape:
                    break
            specs.append((obj, random_scene(rng, context=context, style=style)))
    return specs


def colour_context_specs(seed: int = 0) -> list[tuple[ObjectSpec, SceneSpec]]:
    """Photos of plain balls, rows by colour (the first six), columns by context."""
    rng = np.random.default_rng(seed)
    return [(ObjectSpec("cube" if colour == "purple" else "ball", colour),
             random_scene(rng, context=context, style="photo"))
            for colour in list(COLOURS)[:6] for context in CONTEXTS]


def grid_of(samples: list[Sample], columns: int, *, scale: int = 3) -> Image.Image:
    rows = [[s.image for s in samples[i:i + columns]] for i in range(0, len(samples), columns)]
    return scene_grid(rows, scale=scale)


def plot_losses(record: dict, path: str | Path) -> Path:
    """The VAE reconstruction and denoiser loss curves of a training record."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    vae = record["vae_log"]
    left.plot([r["step"] for r in vae], [r["mse"] for r in vae], color="tab:orange")
    left.set(title="VAE reconstruction (MSE, [-1, 1] pixels)", xlabel="step", yscale="log")
    unet = record["denoiser_log"]
    steps = [r["step"] for r in unet]
    right.plot(steps, [r["loss"] for r in unet], color="tab:blue", label="weighted (optimised)")
    if "mse" in unet[0]:
        right.plot(steps, [r["mse"] for r in unet], color="tab:green", label="plain ε MSE")
        right.legend()
    right.set(title="text encoder + UNet (ε loss)", xlabel="step")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return Path(path)


def accuracy_on_samples(pipeline: StableDiffusionPipeline, clip_folder: str | Path, *,
                        count: int = 150, seed: int = 1) -> dict:
    """The toy CLIP's zero-shot attribute accuracy on ``count`` base-model samples and on the
    true renders of the same captions: how much of each caption the base model draws."""
    from eqdiff.metrics import CLIPScorer
    from eqdiff.toyworld.evaluators import ATTRIBUTE_VALUES, zero_shot_predictions
    from eqdiff.toyworld.world import render

    rng = np.random.default_rng(seed)
    specs = [(random_object(rng), random_scene(rng)) for _ in range(count)]
    samples = draw(pipeline, specs, seed=seed)
    truth = [render(o, s, size=samples[0].image.width)[0] for o, s in specs]
    clip = CLIPScorer(f"local-dir:{clip_folder}", "", batch_size=256)
    objects, scenes = [o for o, _ in specs], [s for _, s in specs]
    result = {}
    for name, images in (("world", truth), ("base_model", [s.image for s in samples])):
        predictions = zero_shot_predictions(clip, images, objects, scenes)
        accuracy = predictions.groupby("attribute", sort=False)["correct"].mean()
        result[name] = {a: round(float(v), 4) for a, v in accuracy.items()}
    result["chance"] = {a: round(1 / len(v), 4) for a, v in ATTRIBUTE_VALUES.items()}
    result["images"] = count
    return result


def _file_sizes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*.safetensors"))}


def _parameters(pipeline: StableDiffusionPipeline) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
            for name in ("text_encoder", "unet", "vae")}


def write_model_card(models_root: str | Path) -> Path:
    """Sample grids, loss curves and evaluator checks into ``<models_root>/base/README.md``."""
    root = Path(models_root)
    base = root / "base"
    record = json.loads((base / "training.json").read_text("utf-8"))
    pictures = base / "card"
    pictures.mkdir(exist_ok=True)
    pipeline = load_pipeline(base)
    plot_losses(record, pictures / "loss.png")
    grid_of(draw(pipeline, class_style_specs()), len(STYLES)).save(pictures / "class_style.png")
    grid_of(draw(pipeline, colour_context_specs(), seed=2), len(CONTEXTS)).save(
        pictures / "colour_context.png")
    checks = accuracy_on_samples(pipeline, root / "clip")
    sizes = _file_sizes(base)
    card = {"parameters": _parameters(pipeline), "safetensors_bytes": sizes,
            "evaluator_accuracy": checks, "guidance_scale": CARD_GUIDANCE,
            "sampling_steps": CARD_STEPS}
    (pictures / "card.json").write_text(json.dumps(card, indent=1))
    (base / "README.md").write_text(_card_text(record, card), encoding="utf-8")
    logger.info("model card written to %s", base / "README.md")
    return base / "README.md"


def _card_text(record: dict, card: dict) -> str:
    cfg, timings = record["config"], record["timings"]
    checks = card["evaluator_accuracy"]
    rows = "\n".join(f"| {a} | {checks['world'][a]:.2f} | {checks['base_model'][a]:.2f} | "
                      f"{checks['chance'][a]:.2f} |" for a in checks["world"])
    params = card["parameters"]
    total_bytes = sum(card["safetensors_bytes"].values())
    last = record["denoiser_log"][-1]["loss"]
    first = record["denoiser_log"][0]["loss"]
    last_mse = (f"{record['denoiser_log'][-1]['mse']:.3f}" if "mse" in record["denoiser_log"][-1]
                else "not recorded")
    return f"""---
library_name: diffusers
pipeline_tag: text-to-image
tags: [toy, stable-diffusion-1.x-layout, eqdiff]
---

# eqdiff toy-world base model

A text-to-image model in Stable Diffusion 1.x's layout and classes (`AutoencoderKL`, CLIP text
encoder with CLIP's real BPE tokenizer, `UNet2DConditionModel`, PNDM scheduler with SD's
scaled-linear schedule, ε-prediction), trained **from scratch on this machine** on the toy
world of `eqdiff/toyworld/world.py`. It exists so that customization can be seen and measured
without downloadable weights; it goes through exactly the code paths SD-1.5 does.

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("eqdiff/data/toyworld/base")
pipe("a watercolor painting of a red ball with blue stripes in the snow", height=32, width=32,
     guidance_scale={CARD_GUIDANCE}).images[0]
```

## Data

{cfg['corpus_size']:,} rendered 32×32 scenes (seed {cfg['seed']}): six classes (ball, cube, cone,
ring, star, cup), ten colours, four patterns (plain, striped, dotted, checkered), five contexts
(plain, beach, snow, grass, city) and five styles (photo, watercolor, pencil sketch, pixel art,
neon), captioned from their attributes, pattern colour included, e.g. "a pencil sketch of a
blue cube with red dots on the grass". The benchmark's novel subjects never appear: zigzag and
two-tone patterns are not drawn at all, and their class/colour pairs (teal ring, red star,
purple cone, orange cup) are held out.

## Model and training

| part | parameters | stored as |
|---|---|---|
| text encoder (CLIP, 4 layers, width 32, 49,408 tokens) | {params['text_encoder']:,} | float32 |
| UNet (32/48/64 channels, cross-attention at 8×8 and 4×4) | {params['unet']:,} | float16 |
| VAE (scale factor 2: 32 px ↔ 4×16×16) | {params['vae']:,} | float16 |

Weights: {total_bytes / 1e6:.2f} MB of safetensors. The text encoder stays float32 because
transformers keeps a checkpoint's dtype and the standard pipeline would then mix dtypes;
diffusers loads the float16 UNet and VAE as float32.

1. VAE: {cfg['vae_steps']} steps, batch {cfg['batch_size']}, MSE + {cfg['vae_kl_weight']} × KL;
   latent scaling factor {record['latent_scaling_factor']} (unit-variance latents).
2. Text encoder + UNet together: {cfg['unet_steps']} steps, batch {cfg['batch_size']}, AdamW (UNet
   lr {cfg['unet_lr']}, text lr {cfg['text_lr']}), {cfg['warmup_steps']} warm-up steps then
   cosine decay, {cfg['caption_dropout']:.0%} empty captions (for classifier-free guidance), EMA
   {cfg['ema_decay']} (the EMA weights are saved). The ε-loss is weighted by Min-SNR-γ
   (γ = {cfg.get('snr_gamma', 0)}) per sample and by the object's mask per latent pixel
   (1 + {cfg.get('object_loss_weight', 0)} on the object), so that the small UNet learns shapes and
   colours, not only backgrounds and styles. Weighted loss {first:.3f} → {last:.3f}; plain ε MSE
   at the end {last_mse}.

Time on {cfg['threads']} CPU threads: render {timings['render_s']:.0f} s, VAE
{timings['vae_s']:.0f} s, text encoder + UNet {timings['denoiser_s']:.0f} s, total
**{timings['total_s'] / 60:.1f} min**. Reproduce with `eqdiff toyworld train-base` (same
defaults), then `eqdiff toyworld card` for this page.

![loss curves](card/loss.png)

## What it draws

Rows: classes; columns: photo, watercolor, sketch, pixel art, neon (plain context, random
colours and patterns; {CARD_STEPS} PNDM steps, guidance {CARD_GUIDANCE}):

![class × style](card/class_style.png)

Rows: red, orange, yellow, green ball, blue ball, purple cube; columns: plain, beach, snow, grass,
city:

![colour × context](card/colour_context.png)

The toy CLIP (`../clip`) reads each attribute back by zero-shot caption retrieval, on
{checks['images']} random captions: once on the world's true renders of those captions, once on
this model's samples of them. The gap is what the model fails to draw.

| attribute | true renders | base-model samples | chance |
|---|---|---|---|
{rows}
"""
