"""Looking at masks: IoU against a reference, overlays on their images, overlay grids."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks (1.0 when both are empty)."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    union = np.logical_or(predicted, truth).sum()
    return float(np.logical_and(predicted, truth).sum() / union) if union else 1.0


def overlay(image: Image.Image, mask: np.ndarray, *, colour: tuple[int, int, int] = (255, 40, 40),
            tint: float = 0.3, label: str = "") -> Image.Image:
    """The image with the masked area tinted, the mask contour drawn, and an optional label."""
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    mask = np.asarray(mask, dtype=bool)
    rgb[mask] = (1 - tint) * rgb[mask] + tint * np.asarray(colour, np.float32)
    canvas = np.ascontiguousarray(rgb.round().astype(np.uint8))
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(canvas, contours, -1, colour, max(1, min(canvas.shape[:2]) // 150))
    result = Image.fromarray(canvas)
    if label:
        draw = ImageDraw.Draw(result)
        draw.rectangle((0, 0, 7 * len(label) + 6, 14), fill=(0, 0, 0))
        draw.text((3, 1), label, fill=(255, 255, 255))
    return result


def overlay_grid(rows: Sequence[Sequence[Image.Image]], *, tile: int = 256) -> Image.Image:
    """Rows of pictures as one image of ``tile``-px squares (short rows padded with grey)."""
    columns = max((len(row) for row in rows), default=0)
    grid = Image.new("RGB", (max(columns, 1) * tile, max(len(rows), 1) * tile), (64, 64, 64))
    for r, row in enumerate(rows):
        for c, picture in enumerate(row):
            grid.paste(picture.convert("RGB").resize((tile, tile), Image.Resampling.BILINEAR),
                       (c * tile, r * tile))
    return grid
