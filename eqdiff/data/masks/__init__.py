"""Subject masks for mask-guided diffusion (docs/method.md §4).

Extractors share one protocol, :class:`MaskExtractor`: ``extract(MaskInput) -> (H, W) bool``,
raising :class:`MaskUnavailable` when they have nothing to say about an image (no alpha, no
user mask, nothing detected) so :func:`extract_mask` can fall back — configured extractor, then
the configured fallback, then the all-ones ``full`` mask. A mask covering less than
``masks.min_coverage`` of its image (an empty one always) falls back the same way, so no mask
used for training is empty. Every :class:`MaskResult` (and every saved mask PNG) records the
extractor that made it and why any extractor before it was passed over.

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

Modules:

- :mod:`~eqdiff.data.masks.codec`: binarising, reading user masks, the mask PNG format, tensors.
- :mod:`~eqdiff.data.masks.extractors`: the protocol, ``full``, ``alpha``, ``provided``,
  ``grabcut``.
- :mod:`~eqdiff.data.masks.learned`: ``grounded-sam`` and ``clipseg``, loaded lazily.
- :mod:`~eqdiff.data.masks.cache`: cache keys and :class:`MaskCache`.
- :mod:`~eqdiff.data.masks.chain`: :func:`build_extractor`, the fallback chain (unavailable and
  near-empty masks), coverage warnings, :func:`write_subject_masks`.
- :mod:`~eqdiff.data.masks.preview`: IoU, overlays and overlay grids.
"""

from eqdiff.data.masks.cache import CachedMask, MaskCache
from eqdiff.data.masks.chain import (
    FULL_COVERAGE,
    MaskResult,
    SubjectMasks,
    build_extractor,
    extract_mask,
    mask_coverage,
    write_subject_masks,
)
from eqdiff.data.masks.codec import (
    MASK_PNG_KEY,
    binarise,
    decode_mask_png,
    encode_mask_png,
    mask_to_tensor,
    read_mask_image,
)
from eqdiff.data.masks.extractors import (
    AlphaMask,
    FullMask,
    GrabCutMask,
    MaskExtractor,
    MaskInput,
    MaskUnavailable,
    ProvidedMasks,
    fill_holes,
    keep_largest_components,
    settings_hash,
)
from eqdiff.data.masks.learned import LEARNED_EXTRACTORS, ClipSegMask, GroundedSamMask
from eqdiff.data.masks.preview import mask_iou, overlay, overlay_grid

__all__ = [
    "LEARNED_EXTRACTORS",
    "FULL_COVERAGE",
    "MASK_PNG_KEY",
    "AlphaMask",
    "ClipSegMask",
    "FullMask",
    "GrabCutMask",
    "GroundedSamMask",
    "CachedMask",
    "MaskCache",
    "MaskExtractor",
    "MaskInput",
    "MaskResult",
    "MaskUnavailable",
    "ProvidedMasks",
    "SubjectMasks",
    "binarise",
    "build_extractor",
    "decode_mask_png",
    "encode_mask_png",
    "extract_mask",
    "fill_holes",
    "keep_largest_components",
    "mask_coverage",
    "mask_iou",
    "mask_to_tensor",
    "overlay",
    "overlay_grid",
    "read_mask_image",
    "settings_hash",
    "write_subject_masks",
]
