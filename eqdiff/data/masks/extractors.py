"""Mask extractors that need no model weights, and the protocol every extractor follows.

An extractor's ``extract(MaskInput)`` returns an ``(H, W)`` bool mask at the image size, or
raises :class:`MaskUnavailable` when it has nothing to say about the image, so that
:func:`eqdiff.data.masks.chain.extract_mask` can fall back to the next one. It may return an
empty mask: the chain falls back past any mask covering less than ``masks.min_coverage``. The
seeding of :class:`GrabCutMask` is described in the package docstring (:mod:`eqdiff.data.masks`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image

from eqdiff.config import config_hash
from eqdiff.data.images import IMAGE_SUFFIXES, SquareFit, fit_mask
from eqdiff.data.masks.codec import binarise, read_mask_image

logger = logging.getLogger(__name__)


class MaskUnavailable(Exception):
    """This extractor has no mask for this image; the caller falls back to the next one.

    A signal, not a failure: hence the name without an ``Error`` suffix. The message says why,
    without the image's name: the fallback chain records it under that name.
    """


@dataclass(frozen=True, eq=False)
class MaskInput:
    """One training image and what extractors may use to mask it."""

    image: Image.Image  # RGB, the normalised training image
    sha256: str  # content hash of the image file: the cache key
    name: str  # image file stem: provided masks are matched by it
    class_noun: str = ""
    alpha: Image.Image | None = None  # "L", same geometry as ``image``
    fit: SquareFit | None = None  # how the source became ``image`` (for provided masks)


class MaskExtractor(Protocol):
    """A way of making subject masks. ``extract`` returns ``(H, W)`` bool at the image size."""

    name: str
    cacheable: bool  # worth caching (slow); cheap ones that read user files are not

    def settings(self) -> dict[str, Any]:
        """The settings that change the masks (JSON values), hashed into the cache key."""
        ...

    def extract(self, item: MaskInput) -> np.ndarray:
        """The subject mask, or :class:`MaskUnavailable`."""
        ...


def settings_hash(extractor: MaskExtractor) -> str:
    """Stable hash of an extractor's name and settings."""
    return config_hash({"extractor": extractor.name, **extractor.settings()}, length=12)


# --------------------------------------------------------------------------- simple extractors

@dataclass(frozen=True)
class FullMask:
    """The all-ones mask."""

    name: str = "full"
    cacheable: bool = False

    def settings(self) -> dict[str, Any]:
        return {}

    def extract(self, item: MaskInput) -> np.ndarray:
        width, height = item.image.size
        return np.ones((height, width), dtype=bool)


@dataclass(frozen=True)
class AlphaMask:
    """The alpha channel of a transparent input, thresholded; opaque or no alpha: unavailable."""

    threshold: int = 128
    name: str = "alpha"
    cacheable: bool = False

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def extract(self, item: MaskInput) -> np.ndarray:
        if item.alpha is None:
            raise MaskUnavailable("the image has no alpha channel")
        alpha = np.asarray(item.alpha.convert("L"))
        if alpha.min() == 255:
            raise MaskUnavailable("the alpha channel is fully opaque")
        return alpha >= self.threshold


@dataclass(frozen=True)
class ProvidedMasks:
    """User masks from ``folder``, matched by the image's file stem (any image suffix).

    A mask the size of the source image is replayed through the image's square fit; one the size
    of the training image is used as is; any other size is resized to the source first.
    """

    folder: Path
    name: str = "provided"
    cacheable: bool = False

    def settings(self) -> dict[str, Any]:
        return {"folder": str(self.folder)}

    def find(self, stem: str) -> Path | None:
        """The mask file for an image stem, preferring PNG; None when there is none."""
        if not self.folder.is_dir():
            return None
        matches = sorted((p for p in self.folder.iterdir()
                          if p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES),
                         key=lambda p: (p.suffix.lower() != ".png", p.name))
        return matches[0] if matches else None

    def extract(self, item: MaskInput) -> np.ndarray:
        path = self.find(item.name)
        if path is None:
            raise MaskUnavailable(f"no provided mask in {self.folder}")
        with Image.open(path) as opened:
            mask = read_mask_image(opened)
        target = item.image.size
        if item.fit is not None and mask.size != target:
            if mask.size != item.fit.source_size:
                logger.info("provided mask %s is %dx%d, its image %dx%d: resized", path,
                            *mask.size, *item.fit.source_size)
                mask = mask.resize(item.fit.source_size, Image.Resampling.BILINEAR)
            mask = fit_mask(mask, item.fit)
        elif mask.size != target:
            logger.info("provided mask %s is %dx%d, its image %dx%d: resized", path, *mask.size,
                        *target)
            mask = mask.resize(target, Image.Resampling.BILINEAR)
        return binarise(np.asarray(mask))


# --------------------------------------------------------------------------- grabcut

def keep_largest_components(mask: np.ndarray, *, min_fraction: float = 0.2) -> np.ndarray:
    """Keep the largest 8-connected component and those at least ``min_fraction`` of its area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count <= 1:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= min_fraction * areas.max()) + 1
    return np.isin(labels, keep)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions that do not touch the image border."""
    background = (~mask.astype(bool)).astype(np.uint8)
    count, labels = cv2.connectedComponents(background, connectivity=4)
    border_labels = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0],
                                              labels[:, -1]]))
    holes = (labels > 0) & ~np.isin(labels, border_labels)
    return mask.astype(bool) | holes


def _border_colour_share(lab: np.ndarray, band: np.ndarray, bins: int) -> np.ndarray:
    """For every pixel, the share of border pixels whose colour is near its own.

    Colours are quantised into ``bins``³ Lab cells and the border histogram is summed over each
    cell's 3×3×3 neighbourhood, so a pixel gets a high share when its colour is common along the
    border (background-like) and ~0 when the border never shows it.
    """
    cells = (lab.astype(np.int32) * bins) // 256
    flat = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    histogram = np.bincount(flat[band], minlength=bins ** 3).reshape(bins, bins, bins)
    histogram = histogram / max(int(band.sum()), 1)
    padded = np.pad(histogram, 1)
    smoothed = sum(padded[i:i + bins, j:j + bins, k:k + bins]
                   for i in range(3) for j in range(3) for k in range(3))
    return smoothed.reshape(-1)[flat]


@dataclass(frozen=True)
class GrabCutMask:
    """OpenCV GrabCut seeded automatically; see the package docstring.

    The image is reduced to ``working_size`` on its long side. Seeds: a centred ellipse with
    semi-axes ``centre`` × size is probable foreground, the rest probable background, and the
    pixels of a border band (``border`` × side) are certain background when their colour is
    common along the border (at least ``background_share`` of it, see
    :func:`_border_colour_share`) — so a subject that touches the border is not forced into the
    background there. After ``iterations`` GrabCut rounds the mask is upsampled, components
    under a fifth of the largest dropped and holes filled.

    (Seeding only colours that are rare on the border as foreground was tried and rejected: on
    close-ups, whose subject touches the border, it left almost no foreground seeds and GrabCut
    returned near-empty masks.)
    """

    iterations: int = 5
    working_size: int = 256
    border: float = 0.04
    centre: float = 0.35
    background_share: float = 0.01
    colour_bins: int = 16
    name: str = "grabcut"
    cacheable: bool = True

    def settings(self) -> dict[str, Any]:
        return {"iterations": self.iterations, "working_size": self.working_size,
                "border": self.border, "centre": self.centre,
                "background_share": self.background_share, "colour_bins": self.colour_bins}

    def seeds(self, rgb: np.ndarray) -> np.ndarray:
        """The initial GrabCut label map (cv2.GC_*) for an RGB uint8 array."""
        height, width = rgb.shape[:2]
        lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
        band_width = max(1, round(self.border * min(height, width)))
        band = np.zeros((height, width), dtype=bool)
        band[:band_width], band[-band_width:] = True, True
        band[:, :band_width], band[:, -band_width:] = True, True
        share = _border_colour_share(lab, band, self.colour_bins)
        background_like = share >= self.background_share
        yy, xx = np.mgrid[0:height, 0:width]
        ellipse = (((xx + 0.5 - width / 2) / (self.centre * width)) ** 2
                   + ((yy + 0.5 - height / 2) / (self.centre * height)) ** 2) <= 1
        seeds = np.full((height, width), cv2.GC_PR_BGD, dtype=np.uint8)
        seeds[ellipse] = cv2.GC_PR_FGD
        seeds[band & background_like] = cv2.GC_BGD
        return seeds

    def extract(self, item: MaskInput) -> np.ndarray:
        width, height = item.image.size
        scale = min(1.0, self.working_size / max(width, height))
        small = item.image.convert("RGB")
        if scale < 1.0:
            small = small.resize((max(1, round(width * scale)), max(1, round(height * scale))),
                                 Image.Resampling.BILINEAR)
        rgb = np.ascontiguousarray(np.asarray(small))
        labels = self.seeds(rgb)
        if not (labels == cv2.GC_PR_BGD).any() and not (labels == cv2.GC_BGD).any():
            raise MaskUnavailable("no background seeds for GrabCut")
        background_model = np.zeros((1, 65), np.float64)
        foreground_model = np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's RNG: same input, same mask
        cv2.grabCut(rgb, labels, None, background_model, foreground_model, self.iterations,
                    cv2.GC_INIT_WITH_MASK)
        found = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
        if scale < 1.0:
            found = cv2.resize(found, (width, height), interpolation=cv2.INTER_LINEAR)
        return fill_holes(keep_largest_components(found >= 0.5))
