"""Subject masks for mask-guided diffusion (METHOD.md §4).

Extractors share one protocol, :class:`MaskExtractor`: ``extract(MaskInput) -> (H, W) bool``,
raising :class:`MaskUnavailable` when they have nothing to say about an image (no alpha, no
user mask, nothing detected) so :func:`extract_mask` can fall back — configured extractor, then
the configured fallback, then the all-ones ``full`` mask. Every :class:`MaskResult` (and every
saved mask PNG) records the extractor that made it.

- ``provided``: user masks in a folder, matched by image file stem; resized if their size
  differs, replayed through the image's :class:`~eqdiff.data.images.SquareFit`.
- ``alpha``: the alpha channel of transparent inputs.
- ``grabcut`` (default, no weights): OpenCV GrabCut seeded automatically — a centred ellipse is
  probable foreground, border pixels whose colour is common along the border are certain
  background — then the largest components are kept and holes filled.
- ``grounded-sam``: Grounding DINO finds the class noun's box, SAM segments inside it.
- ``clipseg``: CLIPSeg's text-prompted heat map, thresholded.
- ``full``: all ones (ablations, last fallback).

Expensive extractors are cached under ``cache/masks/{image_sha}/{extractor}-{settings_hash}.png``
through a :class:`MaskCache` (a folder, or get/put callables over any artifact store). The latent
masks training uses are made from these by :func:`eqdiff.method.losses.latent_masks`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, PngImagePlugin

from eqdiff.config import MaskConfig, config_hash
from eqdiff.data.images import IMAGE_SUFFIXES, SquareFit, fit_mask

logger = logging.getLogger(__name__)

EMPTY_COVERAGE = 0.01  # below: the extractor most likely found nothing
FULL_COVERAGE = 0.95  # above: the extractor most likely took the background too
MASK_PNG_KEY = "eqdiff-mask"  # PNG text chunk recording extractor and settings


class MaskUnavailable(Exception):  # noqa: N818 - a signal, not a failure
    """This extractor has no mask for this image; the caller falls back to the next one."""


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


# --------------------------------------------------------------------------- mask files

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
            raise MaskUnavailable(f"{item.name}: the image has no alpha channel")
        alpha = np.asarray(item.alpha.convert("L"))
        if alpha.min() == 255:
            raise MaskUnavailable(f"{item.name}: the alpha channel is fully opaque")
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
            raise MaskUnavailable(f"{item.name}: no provided mask in {self.folder}")
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
    """OpenCV GrabCut seeded automatically; see the module docstring.

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
            raise MaskUnavailable(f"{item.name}: no background seeds for GrabCut")
        background_model = np.zeros((1, 65), np.float64)
        foreground_model = np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's RNG: same input, same mask
        cv2.grabCut(rgb, labels, None, background_model, foreground_model, self.iterations,
                    cv2.GC_INIT_WITH_MASK)
        found = np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.float32)
        if scale < 1.0:
            found = cv2.resize(found, (width, height), interpolation=cv2.INTER_LINEAR)
        return fill_holes(keep_largest_components(found >= 0.5))


# --------------------------------------------------------------------------- model extractors

def _load_pretrained(loader: Callable[..., Any], source: str, what: str,
                     local_files_only: bool) -> Any:
    if not source:
        raise ValueError(f"no {what} configured: set a local path or hub id")
    try:
        return loader(source, local_files_only=local_files_only)
    except (OSError, ValueError) as error:
        raise ValueError(f"could not load the {what} from {source!r} (a local folder or a hub id "
                         f"already in the local cache; downloads may be off): {error}") from error


@dataclass(frozen=True, eq=False)
class GroundedSamMask:
    """Grounding DINO box for ``"a {class_noun}."`` (highest score), then SAM inside the box."""

    detector_model: str
    segmentation_model: str
    box_threshold: float = 0.3
    text_threshold: float = 0.25
    device: str = "cpu"
    local_files_only: bool = False
    name: str = "grounded-sam"
    cacheable: bool = True

    def settings(self) -> dict[str, Any]:
        return {"detector_model": self.detector_model,
                "segmentation_model": self.segmentation_model,
                "box_threshold": self.box_threshold, "text_threshold": self.text_threshold}

    @cached_property
    def _detector(self) -> tuple[Any, Any]:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        processor = _load_pretrained(AutoProcessor.from_pretrained, self.detector_model,
                                     "Grounding DINO processor", self.local_files_only)
        model = _load_pretrained(AutoModelForZeroShotObjectDetection.from_pretrained,
                                 self.detector_model, "Grounding DINO model",
                                 self.local_files_only)
        return processor, model.to(self.device).eval()

    @cached_property
    def _segmenter(self) -> tuple[Any, Any]:
        from transformers import SamModel, SamProcessor

        processor = _load_pretrained(SamProcessor.from_pretrained, self.segmentation_model,
                                     "SAM processor", self.local_files_only)
        model = _load_pretrained(SamModel.from_pretrained, self.segmentation_model,
                                 "SAM model", self.local_files_only)
        return processor, model.to(self.device).eval()

    def box(self, item: MaskInput) -> list[float]:
        """The best (x0, y0, x1, y1) box for the class noun, in image pixels."""
        processor, model = self._detector
        width, height = item.image.size
        inputs = processor(images=item.image, text=f"a {item.class_noun or 'object'}.",
                           return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = model(**inputs)
        found = processor.post_process_grounded_object_detection(
            outputs, inputs["input_ids"], threshold=self.box_threshold,
            text_threshold=self.text_threshold, target_sizes=[(height, width)])[0]
        if len(found["scores"]) == 0:
            raise MaskUnavailable(f"{item.name}: Grounding DINO found no {item.class_noun!r}")
        best = int(found["scores"].argmax())
        x0, y0, x1, y1 = found["boxes"][best].tolist()
        return [max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1)]

    def extract(self, item: MaskInput) -> np.ndarray:
        box = self.box(item)
        processor, model = self._segmenter
        inputs = processor(item.image, input_boxes=[[box]], return_tensors="pt").to(self.device)
        with torch.no_grad():
            outputs = model(**inputs, multimask_output=False)
        masks = processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(), inputs["original_sizes"].cpu(),
            inputs["reshaped_input_sizes"].cpu())
        return masks[0][0, 0].numpy().astype(bool)


@dataclass(frozen=True, eq=False)
class ClipSegMask:
    """CLIPSeg heat map for ``"a {class_noun}"``, sigmoid, bilinear to image size, thresholded."""

    model: str
    threshold: float = 0.4
    device: str = "cpu"
    local_files_only: bool = False
    name: str = "clipseg"
    cacheable: bool = True

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "threshold": self.threshold}

    @cached_property
    def _model(self) -> tuple[Any, Any]:
        from transformers import AutoProcessor, CLIPSegForImageSegmentation

        processor = _load_pretrained(AutoProcessor.from_pretrained, self.model,
                                     "CLIPSeg processor", self.local_files_only)
        model = _load_pretrained(CLIPSegForImageSegmentation.from_pretrained, self.model,
                                 "CLIPSeg model", self.local_files_only)
        return processor, model.to(self.device).eval()

    def extract(self, item: MaskInput) -> np.ndarray:
        processor, model = self._model
        inputs = processor(text=[f"a {item.class_noun or 'object'}"], images=[item.image],
                           return_tensors="pt", padding=True).to(self.device)
        with torch.no_grad():
            logits = model(**inputs).logits
        heat = torch.sigmoid(logits.float().reshape(-1, *logits.shape[-2:])[:1, None])
        width, height = item.image.size
        heat = F.interpolate(heat, size=(height, width), mode="bilinear", align_corners=False)
        return (heat[0, 0] >= self.threshold).cpu().numpy()


def build_extractor(name: str, config: MaskConfig, *, mask_dir: str | Path | None = None,
                    device: str = "cpu", local_files_only: bool = False) -> MaskExtractor:
    """The extractor called ``name``, with settings from ``config``."""
    if name == "grabcut":
        return GrabCutMask()
    if name == "full":
        return FullMask()
    if name == "alpha":
        return AlphaMask()
    if name == "provided":
        if mask_dir is None:
            raise ValueError("the 'provided' mask extractor needs the subject's mask folder")
        return ProvidedMasks(Path(mask_dir))
    if name == "grounded-sam":
        return GroundedSamMask(config.detector_model, config.segmentation_model, device=device,
                               local_files_only=local_files_only)
    if name == "clipseg":
        return ClipSegMask(config.segmentation_model, threshold=config.clipseg_threshold,
                           device=device, local_files_only=local_files_only)
    raise ValueError(f"unknown mask extractor {name!r}; known: grabcut, provided, alpha, "
                     "grounded-sam, clipseg, full")


# --------------------------------------------------------------------------- cache

def mask_cache_key(image_sha: str, extractor: str, settings_digest: str) -> str:
    """``cache/masks/{image_sha}/{extractor}-{settings_hash}.png`` (relative to a store root)."""
    return f"cache/masks/{image_sha}/{extractor}-{settings_digest}.png"


@dataclass(frozen=True)
class MaskCache:
    """Mask PNG bytes by key: any store's get (None when absent) and put."""

    get: Callable[[str], bytes | None]
    put: Callable[[str, bytes], None]

    @classmethod
    def in_folder(cls, root: str | Path) -> MaskCache:
        """A cache in a local folder; keys are relative paths, writes are atomic renames."""
        root = Path(root)

        def get(key: str) -> bytes | None:
            path = root / key
            return path.read_bytes() if path.is_file() else None

        def put(key: str, data: bytes) -> None:
            path = root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)

        return cls(get=get, put=put)


# --------------------------------------------------------------------------- extraction

def mask_coverage(mask: np.ndarray) -> float:
    """Fraction of the image the mask covers."""
    return float(np.asarray(mask, dtype=bool).mean()) if np.size(mask) else 0.0


def coverage_warnings(coverage: float, extractor: str) -> list[str]:
    """Warnings for masks that usually mean the extractor failed (empty or near full)."""
    if coverage < EMPTY_COVERAGE:
        return [f"{extractor} mask is empty or nearly so ({coverage:.1%} of the image): the "
                "subject was probably not found"]
    if coverage > FULL_COVERAGE:
        return [f"{extractor} mask covers {coverage:.1%} of the image: it probably took the "
                "background too"]
    return []


@dataclass(frozen=True, eq=False)
class MaskResult:
    """A subject mask and who made it."""

    mask: np.ndarray  # (H, W) bool
    extractor: str  # the extractor that made this mask
    requested: str  # the configured extractor
    settings_hash: str
    coverage: float
    warnings: tuple[str, ...] = ()
    cache_hit: bool = False

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (no pixels)."""
        return {"extractor": self.extractor, "requested": self.requested,
                "settings_hash": self.settings_hash, "coverage": round(self.coverage, 5),
                "warnings": list(self.warnings), "cache_hit": self.cache_hit}


def _run_extractor(item: MaskInput, extractor: MaskExtractor,
                   cache: MaskCache | None) -> tuple[np.ndarray, str, bool]:
    digest = settings_hash(extractor)
    key = mask_cache_key(item.sha256, extractor.name, digest)
    if cache is not None and extractor.cacheable:
        cached = cache.get(key)
        if cached is not None:
            mask, _ = decode_mask_png(cached)
            if mask.shape == (item.image.size[1], item.image.size[0]):
                return mask, digest, True
            logger.warning("cached mask %s has shape %s, image is %dx%d: recomputing", key,
                           mask.shape, *item.image.size)
    mask = np.asarray(extractor.extract(item), dtype=bool)
    expected = (item.image.size[1], item.image.size[0])
    if mask.shape != expected:
        raise ValueError(f"{extractor.name} returned a {mask.shape} mask for a {expected} image")
    if cache is not None and extractor.cacheable:
        cache.put(key, encode_mask_png(mask, {"extractor": extractor.name,
                                              "settings": extractor.settings()}))
    return mask, digest, False


def extract_mask(item: MaskInput, extractor: MaskExtractor, *,
                 fallback: MaskExtractor | None = None,
                 cache: MaskCache | None = None) -> MaskResult:
    """Mask ``item`` with ``extractor``; on :class:`MaskUnavailable` try ``fallback``, then
    the full mask. Empty and near-full masks get a warning (logged and recorded)."""
    chain = [extractor]
    if fallback is not None and fallback.name != extractor.name:
        chain.append(fallback)
    if chain[-1].name != "full":
        chain.append(FullMask())
    notes: list[str] = []
    for candidate in chain:
        try:
            mask, digest, hit = _run_extractor(item, candidate, cache)
        except MaskUnavailable as reason:
            notes.append(f"{candidate.name} unavailable: {reason}")
            logger.info("%s; falling back", notes[-1])
            continue
        coverage = mask_coverage(mask)
        if candidate.name != "full":
            for warning in coverage_warnings(coverage, candidate.name):
                logger.warning("%s (%s): %s", item.name, item.sha256[:12], warning)
                notes.append(warning)
        return MaskResult(mask=mask, extractor=candidate.name, requested=extractor.name,
                          settings_hash=digest, coverage=coverage, warnings=tuple(notes),
                          cache_hit=hit)
    raise AssertionError("the full mask is always available")  # pragma: no cover


@dataclass(frozen=True)
class SubjectMasks:
    """The masks written for one subject: file names → records, plus the preview."""

    subject: str
    requested: str
    masks: dict[str, dict[str, Any]] = field(default_factory=dict)  # mask file → record
    preview: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "requested": self.requested, "masks": self.masks,
                "preview": self.preview}


def write_subject_masks(subject: str, items: Sequence[MaskInput], output_dir: str | Path,
                        extractor: MaskExtractor, *, fallback: MaskExtractor | None = None,
                        cache: MaskCache | None = None, preview_tile: int = 256) -> SubjectMasks:
    """Mask every image of a subject into ``output_dir``: ``{name}.png`` masks, ``preview.png``
    (overlays) and ``masks.json`` (who made each mask, coverage, warnings), written last."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    overlays = []
    for item in items:
        result = extract_mask(item, extractor, fallback=fallback, cache=cache)
        file = f"{item.name}.png"
        (output_dir / file).write_bytes(encode_mask_png(result.mask, result.record()))
        records[file] = {"image_sha256": item.sha256, **result.record()}
        overlays.append(overlay(item.image, result.mask, label=f"{item.name} {result.extractor} "
                                                               f"{result.coverage:.0%}"))
    written = SubjectMasks(subject=subject, requested=extractor.name, masks=records,
                           preview="preview.png")
    overlay_grid([overlays], tile=preview_tile).save(output_dir / written.preview)
    (output_dir / "masks.json").write_text(json.dumps(written.to_dict(), indent=2))
    return written


def mask_to_tensor(mask: np.ndarray) -> torch.Tensor:
    """(H, W) bool array → float32 tensor (1, H, W) in {0, 1} on the CPU."""
    return torch.from_numpy(np.asarray(mask, dtype=np.float32))[None]


# --------------------------------------------------------------------------- previews

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
