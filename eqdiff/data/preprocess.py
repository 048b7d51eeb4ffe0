"""The preprocessing stage: validate a subject's photos, normalise them, write a manifest.

For each subject: every image is loaded and checked (:func:`eqdiff.data.images.load_image`), bad
ones are listed with the reason, exact duplicates (same sha256) are dropped, and the rest are
normalised to a centred square at the training resolution and written as PNG. A subject left
with fewer than ``min_images`` usable photos is marked failed with the reason; the other
subjects are unaffected. The manifest (``manifest.json``, written last) records per image the
source hash, the output hash, sizes and what was changed; :func:`mask_inputs` turns it into the
inputs of the mask stage.

Output folder of one subject::

    {name}.png          normalised RGB images (name = source file stem)
    alpha/{name}.png    their alpha channel, when the source had one
    manifest.json
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from eqdiff.data.datasets import DEFAULT_MIN_IMAGES, Subject
from eqdiff.data.images import (
    DEFAULT_MAX_CROP_RATIO,
    DEFAULT_MIN_SIDE,
    ImageError,
    PadMode,
    SquareFit,
    bytes_sha256,
    load_image,
    normalise_image,
)
from eqdiff.data.masks import MaskInput

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
ALPHA_FOLDER = "alpha"
SubjectStatus = Literal["ok", "failed"]


def default_min_side(resolution: int) -> int:
    """Smallest short side accepted: a quarter of the resolution (at most 4× upsampling)."""
    return max(DEFAULT_MIN_SIDE, resolution // 4)


@dataclass(frozen=True)
class ImageEntry:
    """One normalised image in a subject manifest."""

    name: str  # file stem, shared by the image, its alpha and its masks
    file: str  # normalised image, relative to the subject folder
    sha256: str  # sha256 of the normalised PNG file
    source: str  # the original file
    source_sha256: str  # sha256 of the original file's bytes
    source_size: tuple[int, int]  # (width, height) as stored
    alpha_file: str | None
    fit: SquareFit
    changes: dict[str, Any]  # ImageChanges.to_dict()


@dataclass(frozen=True)
class RejectedImage:
    """An image left out, and why."""

    source: str
    reason: str


@dataclass(frozen=True)
class SubjectManifest:
    """What preprocessing made of one subject."""

    subject: str
    class_noun: str
    kind: str
    status: SubjectStatus
    reason: str  # why the subject failed ("" when ok)
    resolution: int
    images: tuple[ImageEntry, ...]
    rejected: tuple[RejectedImage, ...]

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubjectManifest:
        images = []
        for entry in data["images"]:
            fit = entry["fit"]
            images.append(ImageEntry(**{
                **entry, "source_size": tuple(entry["source_size"]),
                "fit": SquareFit(source_size=tuple(fit["source_size"]),
                                 crop_box=tuple(fit["crop_box"]),
                                 padding=tuple(fit["padding"]), resolution=fit["resolution"],
                                 pad_mode=fit["pad_mode"])}))
        return cls(**{**data, "images": tuple(images),
                      "rejected": tuple(RejectedImage(**r) for r in data["rejected"])})

    @classmethod
    def read(cls, folder: str | Path) -> SubjectManifest:
        """Read ``folder/manifest.json``."""
        return cls.from_dict(json.loads((Path(folder) / MANIFEST).read_text("utf-8")))


def _save_png(image: Image.Image, path: Path) -> str:
    """Write ``image`` as PNG and return the sha256 of the written bytes."""
    image.save(path, format="PNG")
    return bytes_sha256(path.read_bytes())


def preprocess_subject(subject: Subject, output_dir: str | Path, *, resolution: int,
                       min_images: int = DEFAULT_MIN_IMAGES, min_side: int | None = None,
                       max_crop_ratio: float = DEFAULT_MAX_CROP_RATIO,
                       pad_mode: PadMode = "edge") -> SubjectManifest:
    """Validate and normalise one subject into ``output_dir``; see the module docstring.

    Never raises for bad images or too few of them: the manifest says so. ``min_side`` defaults
    to :func:`default_min_side`.
    """
    output_dir = Path(output_dir)
    if output_dir.resolve() in {path.resolve().parent for path in subject.image_paths}:
        raise ValueError(f"subject {subject.name!r}: the output folder {output_dir} holds its "
                         "source images, which would be overwritten")
    output_dir.mkdir(parents=True, exist_ok=True)
    min_side = default_min_side(resolution) if min_side is None else min_side
    entries: list[ImageEntry] = []
    rejected: list[RejectedImage] = []
    seen: dict[str, str] = {}  # source sha256 → source name
    for path in subject.image_paths:
        try:
            loaded = load_image(path, min_side=min_side)
        except ImageError as error:
            rejected.append(RejectedImage(str(path), error.reason))
            logger.warning("subject %s: %s", subject.name, error)
            continue
        if loaded.sha256 in seen:
            rejected.append(RejectedImage(str(path), f"duplicate of {seen[loaded.sha256]} "
                                                     "(same sha256)"))
            continue
        if any(entry.name == path.stem for entry in entries):
            rejected.append(RejectedImage(str(path), f"another image is also named "
                                                     f"{path.stem!r} (only the stem is kept)"))
            continue
        seen[loaded.sha256] = path.name
        normalised = normalise_image(loaded, resolution, max_crop_ratio=max_crop_ratio,
                                     pad_mode=pad_mode)
        file = f"{path.stem}.png"
        alpha_file = None
        if normalised.alpha is not None:
            (output_dir / ALPHA_FOLDER).mkdir(exist_ok=True)
            alpha_file = f"{ALPHA_FOLDER}/{path.stem}.png"
            normalised.alpha.save(output_dir / alpha_file, format="PNG")
        entries.append(ImageEntry(
            name=path.stem, file=file, sha256=_save_png(normalised.image, output_dir / file),
            source=str(path), source_sha256=loaded.sha256, source_size=loaded.source_size,
            alpha_file=alpha_file, fit=normalised.fit, changes=normalised.changes.to_dict()))
    status: SubjectStatus = "ok"
    reason = ""
    if len(entries) < min_images:
        status = "failed"
        reason = (f"only {len(entries)} usable image(s), need at least {min_images}"
                  + (f"; {len(rejected)} rejected" if rejected else ""))
        logger.warning("subject %s failed: %s", subject.name, reason)
    manifest = SubjectManifest(subject=subject.name, class_noun=subject.class_noun,
                               kind=subject.kind, status=status, reason=reason,
                               resolution=resolution, images=tuple(entries),
                               rejected=tuple(rejected))
    (output_dir / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2))
    return manifest


def preprocess_subjects(subjects: Sequence[Subject], output_root: str | Path, *,
                        resolution: int, **options: Any) -> list[SubjectManifest]:
    """:func:`preprocess_subject` for each subject into ``output_root/{name}``."""
    return [preprocess_subject(subject, Path(output_root) / subject.name,
                               resolution=resolution, **options) for subject in subjects]


def mask_inputs(manifest: SubjectManifest, folder: str | Path) -> list[MaskInput]:
    """The mask stage's inputs for a preprocessed subject in ``folder``."""
    folder = Path(folder)
    items = []
    for entry in manifest.images:
        with Image.open(folder / entry.file) as opened:
            image = opened.convert("RGB")
        alpha = None
        if entry.alpha_file:
            with Image.open(folder / entry.alpha_file) as opened:
                alpha = opened.convert("L")
        items.append(MaskInput(image=image, sha256=entry.sha256, name=entry.name,
                               class_noun=manifest.class_noun, alpha=alpha, fit=entry.fit))
    return items
