"""Making subject masks: the extractor factory and the fallback chain.

:func:`extract_mask` tries the configured extractor, then the configured fallback, then the
all-ones ``full`` mask, reading and filling the :class:`~eqdiff.data.masks.cache.MaskCache` for
cacheable extractors. An extractor is passed over when it has no mask for the image or its mask
covers less than ``masks.min_coverage`` (an empty mask always), so no kept mask is empty. Each
fallback, and each near-full kept mask, is a warning naming the image. :func:`write_subject_masks`
does this for every image of a subject and writes the masks, a preview and ``masks.json``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import numpy as np

from eqdiff.config import MaskConfig, MaskExtractorName
from eqdiff.data.masks.cache import CachedMask, MaskCache
from eqdiff.data.masks.codec import decode_mask_png, encode_mask_png
from eqdiff.data.masks.extractors import (
    AlphaMask,
    FullMask,
    GrabCutMask,
    MaskExtractor,
    MaskInput,
    MaskUnavailable,
    ProvidedMasks,
    settings_hash,
)
from eqdiff.data.masks.learned import ClipSegMask, GroundedSamMask
from eqdiff.data.masks.preview import overlay, overlay_grid

logger = logging.getLogger(__name__)

FULL_COVERAGE = 0.95  # above: the extractor most likely took the background too (a warning)


def build_extractor(name: str, config: MaskConfig, *, mask_dir: str | Path | None = None,
                    device: str = "cpu", local_files_only: bool = True) -> MaskExtractor:
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
    raise ValueError(f"unknown mask extractor {name!r}; known: "
                     f"{', '.join(get_args(MaskExtractorName))}")


# --------------------------------------------------------------------------- extraction

def mask_coverage(mask: np.ndarray) -> float:
    """Fraction of the image the mask covers."""
    return float(np.asarray(mask, dtype=bool).mean()) if np.size(mask) else 0.0


def _percent(fraction: float) -> str:
    """0.003 → ``"0.3 %"``, 0.02 → ``"2 %"``."""
    return f"{fraction * 100:.3g} %"


def _too_small(extractor: str, coverage: float, min_coverage: float) -> str | None:
    """Why a mask of ``coverage`` is not kept (it is empty, or covers less than
    ``min_coverage``), or None when it may be kept."""
    if coverage == 0:
        return f"{extractor} mask is empty"
    if coverage < min_coverage:
        return f"{extractor} mask covers {_percent(coverage)} (< {_percent(min_coverage)})"
    return None


@dataclass(frozen=True, eq=False)
class MaskResult:
    """A subject mask and who made it."""

    mask: np.ndarray  # (H, W) bool
    extractor: str  # the extractor that made this mask
    requested: str  # the configured extractor
    settings_hash: str
    coverage: float
    warnings: tuple[str, ...] = ()  # each names the image
    cache_hit: bool = False
    fallback_reasons: tuple[str, ...] = ()  # why each extractor before this one was passed over

    def record(self) -> dict[str, Any]:
        """JSON-ready summary (no pixels)."""
        return {"extractor": self.extractor, "requested": self.requested,
                "settings_hash": self.settings_hash, "coverage": round(self.coverage, 5),
                "fallback_reasons": list(self.fallback_reasons),
                "warnings": list(self.warnings), "cache_hit": self.cache_hit}


def _run_extractor(item: MaskInput, extractor: MaskExtractor,
                   cache: MaskCache | None) -> tuple[np.ndarray, str, bool]:
    digest = settings_hash(extractor)
    name = CachedMask(item.sha256, extractor.name, digest)
    if cache is not None and extractor.cacheable:
        cached = cache.get(name)
        if cached is not None:
            mask, _ = decode_mask_png(cached)
            if mask.shape == (item.image.size[1], item.image.size[0]):
                return mask, digest, True
            logger.warning("cached %s mask of %s has shape %s, image is %dx%d: recomputing",
                           extractor.name, item.sha256[:12], mask.shape, *item.image.size)
    mask = np.asarray(extractor.extract(item), dtype=bool)
    expected = (item.image.size[1], item.image.size[0])
    if mask.shape != expected:
        raise ValueError(f"{extractor.name} returned a {mask.shape} mask for a {expected} image")
    if cache is not None and extractor.cacheable:
        cache.put(name, encode_mask_png(mask, {"extractor": extractor.name,
                                              "settings": extractor.settings()}))
    return mask, digest, False


def extract_mask(item: MaskInput, extractor: MaskExtractor, *,
                 fallback: MaskExtractor | None = None, cache: MaskCache | None = None,
                 min_coverage: float = MaskConfig.min_coverage) -> MaskResult:
    """Mask ``item`` with ``extractor``, else ``fallback``, else the full mask.

    An extractor is passed over when it raises :class:`MaskUnavailable` or its mask covers less
    than ``min_coverage`` of the image (an empty mask always), so the kept mask is never empty.
    A fallback is a warning naming the image, why each extractor was passed over and which
    mask was used (``"03: grabcut mask covers 0.3 % (< 2 %): used the full mask"``); so is a
    kept mask over :data:`FULL_COVERAGE`. Warnings are logged and recorded in the result.
    """
    chain = [extractor]
    if fallback is not None and fallback.name != extractor.name:
        chain.append(fallback)
    if chain[-1].name != "full":
        chain.append(FullMask())
    passed_over: list[str] = []
    for candidate in chain:
        try:
            mask, digest, hit = _run_extractor(item, candidate, cache)
        except MaskUnavailable as reason:
            passed_over.append(f"{candidate.name} unavailable ({reason})")
            continue
        coverage = mask_coverage(mask)
        small = _too_small(candidate.name, coverage, min_coverage)
        if small is not None and candidate.name != "full":
            passed_over.append(small)
            continue
        warnings = []
        if passed_over:
            warnings.append(f"{item.name}: {'; '.join(passed_over)}: used the {candidate.name} "
                            "mask")
        if coverage > FULL_COVERAGE and candidate.name != "full":
            warnings.append(f"{item.name}: {candidate.name} mask covers {_percent(coverage)} of "
                            "the image: it probably took the background too")
        for warning in warnings:
            logger.warning("%s", warning)
        return MaskResult(mask=mask, extractor=candidate.name, requested=extractor.name,
                          settings_hash=digest, coverage=coverage, warnings=tuple(warnings),
                          cache_hit=hit, fallback_reasons=tuple(passed_over))
    raise AssertionError("the full mask is always available")  # pragma: no cover


@dataclass(frozen=True)
class SubjectMasks:
    """The masks written for one subject: file names → records, plus the preview."""

    subject: str
    requested: str
    masks: dict[str, dict[str, Any]] = field(default_factory=dict)  # mask file → record
    preview: str = ""

    @property
    def fallbacks(self) -> int:
        """How many masks were made by another extractor than the requested one."""
        return sum(bool(record["fallback_reasons"]) for record in self.masks.values())

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "requested": self.requested,
                "fallbacks": self.fallbacks, "masks": self.masks, "preview": self.preview}


def write_subject_masks(subject: str, items: Sequence[MaskInput], output_dir: str | Path,
                        extractor: MaskExtractor, *, fallback: MaskExtractor | None = None,
                        cache: MaskCache | None = None, preview_tile: int = 256,
                        min_coverage: float = MaskConfig.min_coverage) -> SubjectMasks:
    """Mask every image of a subject into ``output_dir`` (see :func:`extract_mask`: no mask is
    empty): ``{name}.png`` masks, ``preview.png`` (overlays) and ``masks.json`` (who made each
    mask and why another extractor was passed over, coverage, warnings, the fallback count),
    written last."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    overlays = []
    for item in items:
        result = extract_mask(item, extractor, fallback=fallback, cache=cache,
                              min_coverage=min_coverage)
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
