"""A small synthetic dataset drawn procedurally, with ground-truth masks.

Three subjects, each a distinct object with its own colours and pattern — a red ball with white
stripes, a blue box drawn as a shaded cube, a green teddy-like toy — photographed
``images_per_subject`` times on varied backgrounds (gradients, checks, stripes, blotchy noise)
at varied positions, scales and small rotations. Written in the plain layout (see
:mod:`eqdiff.datasets`): ``<subject>/NN.png``, ``<subject>/masks/NN.png`` (0 background, 255
subject) and ``subjects.csv``. Deterministic for a seed, so tests and demos can score mask
extractors against the ground truth.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

logger = logging.getLogger(__name__)

SUPERSAMPLING = 4  # objects are drawn at 4× and downsampled, for antialiased edges
DEMO_CLASSES = {"red_ball": "ball", "blue_box": "box", "green_toy": "toy"}
Painter = Callable[[ImageDraw.ImageDraw, float, float, float], None]


def _paint_ball(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    """Red disc with three white horizontal stripes and a highlight."""
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(205, 30, 35, 255))
    for offset in (-0.5, 0.0, 0.5):
        y0, y1 = cy + (offset - 0.09) * r, cy + (offset + 0.09) * r
        half = math.sqrt(max(r * r - (abs(offset) * r + 0.09 * r) ** 2, 0.0))
        draw.rectangle((cx - half, y0, cx + half, y1), fill=(245, 245, 240, 255))
    draw.ellipse((cx - 0.55 * r, cy - 0.7 * r, cx - 0.25 * r, cy - 0.4 * r),
                 fill=(250, 170, 170, 255))


def _paint_box(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    """Blue cube in a three-quarter view: light top, medium left face, dark right face."""
    w, h = 0.87 * r, 0.5 * r
    top = (cx, cy - r)
    left, right, centre = (cx - w, cy - r + h), (cx + w, cy - r + h), (cx, cy - r + 2 * h)
    bottom = (cx, cy + r)
    draw.polygon([top, right, centre, left], fill=(120, 160, 240, 255))
    draw.polygon([left, centre, bottom, (cx - w, cy + r - h)], fill=(40, 80, 200, 255))
    draw.polygon([centre, right, (cx + w, cy + r - h), bottom], fill=(20, 40, 120, 255))


def _paint_toy(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
    """Green teddy: body, head, ears, a pale belly and dark eyes."""
    green, pale = (40, 150, 60, 255), (170, 220, 150, 255)
    draw.ellipse((cx - 0.62 * r, cy - 0.15 * r, cx + 0.62 * r, cy + r), fill=green)
    draw.ellipse((cx - 0.5 * r, cy - 0.85 * r, cx + 0.5 * r, cy + 0.1 * r), fill=green)
    for side in (-1, 1):
        ex = cx + side * 0.42 * r
        draw.ellipse((ex - 0.2 * r, cy - r, ex + 0.2 * r, cy - 0.6 * r), fill=green)
        draw.ellipse((cx + side * 0.2 * r - 0.07 * r, cy - 0.5 * r,
                      cx + side * 0.2 * r + 0.07 * r, cy - 0.36 * r), fill=(15, 20, 15, 255))
    draw.ellipse((cx - 0.33 * r, cy + 0.2 * r, cx + 0.33 * r, cy + 0.8 * r), fill=pale)


PAINTERS: dict[str, Painter] = {"red_ball": _paint_ball, "blue_box": _paint_box,
                                "green_toy": _paint_toy}


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    """A desaturated colour (greys, beiges, browns) so the subjects stand out."""
    grey = rng.uniform(70, 210)
    return np.clip(grey + rng.normal(0, 18, size=3), 0, 255)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size, 3) float background: gradient, checks, stripes or blotchy noise."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    a, b = _muted_colour(rng), _muted_colour(rng)
    style = rng.integers(4)
    if style == 0:  # linear gradient at a random angle
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(angle) + yy * math.sin(angle))
        t = (t - t.min()) / max(np.ptp(t), 1e-6)
    elif style == 1:  # checks
        cells = rng.integers(4, 9)
        t = ((np.floor(xx * cells) + np.floor(yy * cells)) % 2) * 0.6 + 0.2
    elif style == 2:  # soft stripes
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (rng.integers(3, 8) * xx + rng.uniform(0, 1)))
    else:  # blotchy noise, upsampled
        coarse = rng.uniform(0, 1, size=(6, 6)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size),
                                                                 Image.Resampling.BICUBIC))
        t = np.clip(t, 0, 1)
    image = a + (b - a) * t[..., None]
    return image + rng.normal(0, 6, size=image.shape)  # fine texture / sensor noise


def render_demo_image(subject: str, size: int,
                      rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One photo of a demo subject: ``(RGB image, "L" mask with 255 on the subject)``."""
    painter = PAINTERS[subject]
    big = size * SUPERSAMPLING
    radius = big * rng.uniform(0.24, 0.33)
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    painter(ImageDraw.Draw(layer), cx, cy, radius)
    layer = layer.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BICUBIC,
                         center=(cx, cy))
    layer = layer.resize((size, size), Image.Resampling.LANCZOS)
    background = np.clip(_background(size, rng), 0, 255).astype(np.uint8)
    photo = Image.alpha_composite(Image.fromarray(background).convert("RGBA"), layer)
    photo = photo.convert("RGB").filter(ImageFilter.GaussianBlur(0.3))
    mask = layer.getchannel("A").point(lambda v: 255 if v >= 128 else 0)
    return photo, mask


def write_demo_dataset(folder: str | Path, *, size: int = 64, images_per_subject: int = 5,
                       seed: int = 0) -> Path:
    """Write the demo dataset into ``folder`` (created if needed) and return its path."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if images_per_subject < 1:
        raise ValueError(f"images_per_subject must be >= 1, got {images_per_subject}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index, subject in enumerate(PAINTERS):
        rng = np.random.default_rng([seed, index])
        masks = folder / subject / "masks"
        masks.mkdir(parents=True, exist_ok=True)
        for k in range(images_per_subject):
            photo, mask = render_demo_image(subject, size, rng)
            photo.save(folder / subject / f"{k:02d}.png")
            mask.save(masks / f"{k:02d}.png")
    with (folder / "subjects.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["subject", "class"])
        writer.writerows(DEMO_CLASSES.items())
    logger.info("wrote demo dataset (%d subjects x %d images, %d px) to %s", len(PAINTERS),
                images_per_subject, size, folder)
    return folder
