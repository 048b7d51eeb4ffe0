"""Mask pictures and bytes: binarising, reading user masks, the mask PNG format, tensors.

Every mask this package writes is an 8-bit "L" PNG (0 or 255) whose ``eqdiff-mask`` text chunk
holds JSON metadata — at least the extractor that made it.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

MASK_PNG_KEY = "eqdiff-mask"  # PNG text chunk recording extractor and settings


def binarise(values: np.ndarray) -> np.ndarray:
    """A mask array → bool: ``> 0`` for 0/1 masks, ``>= 128`` for 8-bit ones."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    return values > 0 if values.max(initial=0) <= 1 else values >= 128


def read_mask_image(image: Image.Image) -> Image.Image:
    """A mask picture → "L": its alpha if it has a non-constant one, else its luminance."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = image.convert("RGBA").getchannel("A")
        low, high = alpha.getextrema()
        if low != high:
            return alpha
    if image.mode in ("I", "I;16", "F") or image.mode.startswith("I;16"):
        values = binarise(np.asarray(image) > 0)
        return Image.fromarray(values.astype(np.uint8) * 255)
    return image.convert("L")


def encode_mask_png(mask: np.ndarray, metadata: dict[str, Any] | None = None) -> bytes:
    """(H, W) bool → PNG bytes (0/255 "L"), with ``metadata`` as a JSON text chunk."""
    info = PngImagePlugin.PngInfo()
    if metadata:
        info.add_text(MASK_PNG_KEY, json.dumps(metadata, sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=bool).astype(np.uint8) * 255).save(
        buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> tuple[np.ndarray, dict[str, Any]]:
    """PNG bytes written by :func:`encode_mask_png` → (bool mask, metadata)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        metadata = json.loads(image.info.get(MASK_PNG_KEY, "{}"))
        return binarise(np.asarray(read_mask_image(image))), metadata


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """(H, W) bool array → float32 tensor (1, H, W) in {0, 1} on the CPU."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32))[None]
