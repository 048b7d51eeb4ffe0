"""Class-prior images for prior preservation (docs/method.md §7).

The base model draws ``count`` images of the bare class noun (``"{class_noun}"``). Each image
has its own seed (``seed + i``), so a larger count extends a smaller one and the batch size
never changes an image. Subjects of the same class share them:
:func:`eqdiff.method.identity.prior_hash` is the cache key of (base model, class, count,
seed, sampler, resolution).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from PIL import Image

from eqdiff.config import SampleConfig
from eqdiff.method.models import SDComponents
from eqdiff.method.sampling import make_scheduler
from eqdiff.method.training import CLASS_PROMPT

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_class_priors(components: SDComponents, class_noun: str, *, count: int, seed: int,
                          sample: SampleConfig, resolution: int,
                          device: torch.device | str = "cpu", batch_size: int = 8,
                          progress: Callable[[int, int], None] | None = None
                          ) -> list[Image.Image]:
    """Draw ``count`` images of ``class_noun`` with the base model (DDIM, the sample config's
    steps, CFG and negative prompt). Image ``i`` uses seed ``seed + i``."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    pipeline = components.pipeline(make_scheduler("ddim", components.noise_scheduler.config))
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    prompt = CLASS_PROMPT.format(class_noun=class_noun)
    images: list[Image.Image] = []
    for start in range(0, count, batch_size):
        size = min(batch_size, count - start)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(size)]
        result = pipeline([prompt] * size, negative_prompt=[sample.negative_prompt] * size,
                          num_inference_steps=sample.steps,
                          guidance_scale=sample.guidance_scale, eta=sample.eta,
                          height=resolution, width=resolution, generator=generators)
        images.extend(result.images)
        if progress is not None:
            progress(len(images), count)
    logger.info("drew %d class-prior images of %r", count, class_noun)
    return images
