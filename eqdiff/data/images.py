"""Loading, validating, hashing and normalising subject images.

Every image goes through :func:`load_image` (decode fully, first frame of an animation, EXIF
orientation, colour mode → RGB with 16/32-bit and float data scaled to 8 bits, size check, blank
check, sha256 of the file bytes) and then :func:`normalise_image` (square, centred, resized
to the training resolution). Both record what they changed so the preprocessing manifest can say
so. Failures are :class:`ImageError` (a ``ValueError``) naming the file and the reason.

Squaring policy (the subject must not be cropped away): an image whose long/short side ratio is
at most ``max_crop_ratio`` (default 1.1) is centre-cropped, losing at most ~4.5 % of the long side
at each end; anything more elongated is padded to a square instead, with edge replication by
default (``pad_mode``: ``"edge"``, ``"reflect"`` or ``"constant"`` white). Edge replication never
duplicates the subject (reflection can mirror a subject that touches the border) and gives no
hard bars; alpha channels and masks are padded with 0 (background).
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
DEFAULT_MIN_SIDE = 32
# An image whose every colour channel has a standard deviation below this (on 0..255) is taken
# for blank: a lens cap, an empty scan, a failed export.
DEFAULT_MIN_STD = 2.0
_BLANK_CHECK_SIDE = 1024  # larger images are checked on every k-th pixel (no averaging)
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339  # 1 unsigned, 2 signed integer, 3 float
DEFAULT_MAX_CROP_RATIO = 1.1
PadMode = Literal["edge", "reflect", "constant"]
PAD_MODES: tuple[str, ...] = ("edge", "reflect", "constant")
WHITE = (255, 255, 255)
_EXIF_ORIENTATION = 0x0112


class ImageError(ValueError):
    """An image file that cannot be used: names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of raw bytes."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """Content hash of an image: the hex sha256 of the file's bytes (not of decoded pixels)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in ``folder`` (by suffix, case-insensitive), sorted by name.

    Hidden files and sub-folders are skipped; the files are not opened here.
    """
    return scan_folder(folder)[0]


def scan_folder(folder: str | Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split the files directly in ``folder`` into images (as :func:`list_images`) and the
    others, each with the reason it is not used; both sorted by name.

    Hidden files (names starting with ``.``, e.g. ``.DS_Store``) and sub-folders are in neither.
    """
    images, others = [], []
    accepted = ", ".join(sorted(IMAGE_SUFFIXES))
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        suffix = path.suffix.lower()
        if suffix in IMAGE_SUFFIXES:
            images.append(path)
        else:
            others.append((path, f"not an accepted image type ({suffix or 'no suffix'}); "
                                 f"accepted: {accepted}"))
    return images, others


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """A decoded, upright RGB image and where it came from.

    ``alpha`` is the original alpha channel ("L", same orientation) when the file had one
    (RGBA, LA, palette with transparency); ``image`` is then composited on white.
    """

    path: Path
    sha256: str  # sha256 of the file bytes
    image: Image.Image  # RGB uint8, EXIF orientation applied
    alpha: Image.Image | None
    source_format: str
    source_mode: str
    source_size: tuple[int, int]  # (width, height) as stored, before the EXIF rotation
    exif_orientation: int  # 1 = upright (nothing applied); 2..8 = the transform applied
    mode_conversion: str  # "" when the file was already RGB
    frames: int = 1  # frames or pages in the file; only the first is used


def _scale_to_uint8(values: np.ndarray, mode: str,
                    full_scale: int | None = None) -> tuple[np.ndarray, str]:
    """Map a single-channel integer/float array to uint8, saying which rule was used.

    ``full_scale`` is the largest value the file's integer sample type can hold (65535 for
    16-bit), when known: the scale then follows the bit depth, not the values, so a dark photo
    stays dark and a gradient keeps its steps.

    - 16-bit ("I;16*"): divided by 257 (65535 → 255).
    - integer ("I") with a known ``full_scale``: × 255 / ``full_scale``; negative values → 0.
    - integer ("I") of unknown depth: as is when within 0..255, divided by 257 when within
      0..65535 (how 16-bit files often decode), otherwise stretched min..max → 0..255.
    - float ("F"): NaN/inf → 0; ×255 when within [0, 1], as is within [0, 255], else stretched.
    """
    values = values.astype(np.float64)
    if mode == "F":
        values = np.where(np.isfinite(values), values, 0.0)
    low, high = float(values.min()), float(values.max())
    if mode.startswith("I;16") or (mode == "I" and full_scale == 65535):
        scaled, rule = values / 257.0, "16-bit scaled by 1/257"
    elif mode == "I" and full_scale:
        scaled, rule = values * (255.0 / full_scale), f"scaled by 255/{full_scale} (bit depth)"
    elif mode == "F" and low >= 0 and high <= 1:
        scaled, rule = values * 255.0, "float [0,1] scaled by 255"
    elif low >= 0 and high <= 255:
        scaled, rule = values, "values already within 0..255"
    elif mode == "I" and low >= 0 and high <= 65535:
        scaled, rule = values / 257.0, "16-bit range scaled by 1/257"
    else:
        span = high - low if high > low else 1.0
        scaled, rule = (values - low) * (255.0 / span), f"stretched {low:g}..{high:g} to 0..255"
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8), rule


def to_rgb(image: Image.Image, *,
           full_scale: int | None = None) -> tuple[Image.Image, Image.Image | None, str]:
    """Convert any PIL mode to RGB uint8; returns ``(rgb, alpha or None, description)``.

    Transparent images are composited on white and their alpha is returned ("L"). Integer and
    float data are scaled as :func:`_scale_to_uint8` says (``full_scale``: the largest value of
    the file's integer sample type, when known). The description is "" when ``image`` already
    was RGB. Raises ``ValueError`` for modes PIL cannot convert to RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image, None, ""
    rule = ""
    if mode.startswith("I") or mode == "F":
        gray, rule = _scale_to_uint8(np.asarray(image), mode, full_scale)
        work = Image.fromarray(gray)  # 2-D uint8 → mode "L"
    elif mode == "1":
        work = image.convert("L")
    elif mode == "P":
        work = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "RGBa"):
        work = image.convert("RGBA")
    elif mode == "La":
        work = image.convert("LA")
    elif mode in ("L", "LA", "RGBA"):
        work = image
    else:  # CMYK, YCbCr, RGBX, HSV, ...
        try:
            work = image.convert("RGB")
        except ValueError as error:
            raise ValueError(f"unsupported colour mode {mode!r}: {error}") from error
    alpha = None
    if work.mode in ("RGBA", "LA"):
        alpha = work.getchannel("A")
        background = Image.new("RGBA", work.size, (*WHITE, 255))
        rgb = Image.alpha_composite(background, work.convert("RGBA")).convert("RGB")
        how = "composited on white, alpha kept"
    else:
        rgb = work.convert("RGB")
        how = ""
    notes = "; ".join(n for n in (rule, how) if n)
    return rgb, alpha, f"{mode}->RGB" + (f" ({notes})" if notes else "")


def _first_tag(tags: Any, tag: int) -> int | None:
    value = tags.get(tag)
    if isinstance(value, tuple):
        value = value[0] if value else None
    return int(value) if value else None


def _full_scale(image: Image.Image) -> int | None:
    """The largest value of the file's integer sample type, for mode "I", where PIL does not
    keep the bit depth; None when the file does not say."""
    if image.mode != "I":
        return None
    if image.format == "PNG":
        return 65535  # PNG has no deeper samples: "I" from a PNG is 16-bit data
    tags = getattr(image, "tag_v2", None)  # TIFF
    bits = _first_tag(tags, _TIFF_BITS_PER_SAMPLE) if tags is not None else None
    if not bits:
        return None
    signed = _first_tag(tags, _TIFF_SAMPLE_FORMAT) == 2
    return 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1


def pixel_spread(image: Image.Image) -> float:
    """The largest per-channel standard deviation of an RGB image's pixels, on 0..255.

    Images larger than 1024 px are measured on every k-th row and column: single pixels are
    kept, not averaged, so fine texture still counts.
    """
    step = -(-max(image.size) // _BLANK_CHECK_SIDE)
    sample = np.asarray(image.convert("RGB"))[::step, ::step].reshape(-1, 3)
    return float(sample.astype(np.float32).std(axis=0).max())


def load_image(path: str | Path, *, min_side: int = DEFAULT_MIN_SIDE,
               min_std: float = DEFAULT_MIN_STD) -> LoadedImage:
    """Read, fully decode and validate one image file; see :class:`LoadedImage`.

    Raises :class:`ImageError` for unreadable, empty, non-image, corrupt or truncated files, for
    images whose short side (after EXIF rotation) is below ``min_side`` pixels, and for blank
    or nearly uniform images (:func:`pixel_spread` below ``min_std``; 0 turns the check off).
    Of an animated or multi-page file only the first frame is used, and ``frames`` says so.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was set to True elsewhere in this "
                           "process: truncated images would load silently; set it back to False")
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageError(path, f"cannot read file ({error.strerror or error})") from error
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            source_format = opened.format or "unknown"
            try:
                opened.load()  # force the full decode: truncation and corruption show up here
                orientation = int(opened.getexif().get(_EXIF_ORIENTATION, 1) or 1)
                upright = ImageOps.exif_transpose(opened)
                frames = int(getattr(opened, "n_frames", 1) or 1)
            except (OSError, SyntaxError, ValueError, EOFError, TypeError) as error:
                raise ImageError(path, f"corrupt or truncated {source_format} data "
                                       f"({error})") from error
            source_mode, source_size = opened.mode, opened.size
            full_scale = _full_scale(opened)
    except ImageError:
        raise
    except UnidentifiedImageError as error:
        raise ImageError(path, "not an image (no known image format in the file)") from error
    except Image.DecompressionBombError as error:
        raise ImageError(path, f"image too large ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # the header is already broken
        raise ImageError(path, f"corrupt or truncated image header ({error})") from error
    try:
        rgb, alpha, conversion = to_rgb(upright, full_scale=full_scale)
    except ValueError as error:
        raise ImageError(path, str(error)) from error
    width, height = rgb.size
    if min(width, height) < min_side:
        raise ImageError(path, f"image too small: {width}x{height}, the short side must be at "
                               f"least {min_side} px")
    spread = pixel_spread(rgb)
    if spread < min_std:
        raise ImageError(path, f"blank or nearly uniform image (pixel standard deviation "
                               f"{spread:.2f} of 255, below {min_std:g})")
    if frames > 1:
        logger.info("%s: %d frames; only the first is used", path, frames)
    return LoadedImage(path=path, sha256=bytes_sha256(data), image=rgb, alpha=alpha,
                       source_format=source_format, source_mode=source_mode,
                       source_size=source_size,
                       exif_orientation=orientation if 2 <= orientation <= 8 else 1,
                       mode_conversion=conversion, frames=frames)


# --------------------------------------------------------------------------- squaring

@dataclass(frozen=True)
class SquareFit:
    """How an image of ``source_size`` becomes a ``resolution``² square; replayable on masks.

    ``crop_box`` (left, top, right, bottom) is taken first (the full image when not cropping),
    then ``padding`` (left, top, right, bottom) pixels are added, then the square is resized.
    """

    source_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    padding: tuple[int, int, int, int]
    resolution: int
    pad_mode: PadMode = "edge"

    @property
    def cropped(self) -> bool:
        return self.crop_box != (0, 0, *self.source_size)

    @property
    def padded(self) -> bool:
        return any(self.padding)

    @property
    def square_side(self) -> int:
        """Side of the square before resizing."""
        left, top, right, bottom = self.crop_box
        return right - left + self.padding[0] + self.padding[2]

    @property
    def resized(self) -> bool:
        return self.square_side != self.resolution


def plan_square_fit(size: tuple[int, int], resolution: int, *,
                    max_crop_ratio: float = DEFAULT_MAX_CROP_RATIO,
                    pad_mode: PadMode = "edge") -> SquareFit:
    """Plan the square fit of an image of ``size`` = (width, height); see the module docstring."""
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if max_crop_ratio < 1:
        raise ValueError(f"max_crop_ratio must be >= 1, got {max_crop_ratio}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {list(PAD_MODES)}, got {pad_mode!r}")
    width, height = size
    long_side, short_side = max(width, height), min(width, height)
    if long_side / short_side <= max_crop_ratio:
        left, top = (width - short_side) // 2, (height - short_side) // 2
        crop = (left, top, left + short_side, top + short_side)
        padding = (0, 0, 0, 0)
    else:
        crop = (0, 0, width, height)
        extra_x, extra_y = long_side - width, long_side - height
        padding = (extra_x // 2, extra_y // 2, extra_x - extra_x // 2, extra_y - extra_y // 2)
    return SquareFit(source_size=(width, height), crop_box=crop, padding=padding,
                     resolution=resolution, pad_mode=pad_mode)


def _pad(array: np.ndarray, padding: tuple[int, int, int, int], mode: str,
         fill: int | tuple[int, ...]) -> np.ndarray:
    left, top, right, bottom = padding
    widths = [(top, bottom), (left, right)] + [(0, 0)] * (array.ndim - 2)
    if mode == "constant":
        if array.ndim == 3:
            channels = [np.pad(array[..., c], widths[:2], constant_values=np.asarray(fill)[c])
                        for c in range(array.shape[2])]
            return np.stack(channels, axis=-1)
        return np.pad(array, widths, constant_values=fill)
    return np.pad(array, widths, mode=mode)


def fit_image(image: Image.Image, fit: SquareFit) -> Image.Image:
    """Apply ``fit`` to an RGB image (padding per ``fit.pad_mode``, Lanczos resize)."""
    _check_fit_size(image, fit)
    square = image.crop(fit.crop_box)
    if fit.padded:
        square = Image.fromarray(_pad(np.asarray(square.convert("RGB")), fit.padding,
                                      fit.pad_mode, WHITE))
    if fit.resized:
        square = square.resize((fit.resolution, fit.resolution), Image.Resampling.LANCZOS)
    return square


def fit_mask(mask: Image.Image, fit: SquareFit) -> Image.Image:
    """Apply ``fit`` to a single-channel mask or alpha ("L"): padding is 0, bilinear resize.

    The result keeps soft values; binarising is the caller's choice.
    """
    _check_fit_size(mask, fit)
    square = mask.convert("L").crop(fit.crop_box)
    if fit.padded:
        square = Image.fromarray(_pad(np.asarray(square), fit.padding, "constant", 0))
    if fit.resized:
        square = square.resize((fit.resolution, fit.resolution), Image.Resampling.BILINEAR)
    return square


def _check_fit_size(image: Image.Image, fit: SquareFit) -> None:
    if image.size != fit.source_size:
        raise ValueError(f"image is {image.size[0]}x{image.size[1]} but the fit was planned for "
                         f"{fit.source_size[0]}x{fit.source_size[1]}")


@dataclass(frozen=True)
class ImageChanges:
    """What loading and normalising changed in one image (for manifests and reports)."""

    exif_orientation: int  # 1 = none applied
    mode_conversion: str  # "" = none
    upright_size: tuple[int, int]  # (width, height) after the EXIF rotation
    crop_box: tuple[int, int, int, int] | None
    padding: tuple[int, int, int, int] | None
    pad_mode: str | None
    resized_from: tuple[int, int] | None  # square side before resizing, as (w, h)
    resolution: int
    frames: int = 1  # frames or pages in the source file; only the first is used

    def describe(self) -> list[str]:
        """Human-readable list of changes (empty when the image was used as is)."""
        notes = []
        if self.frames > 1:
            notes.append(f"first of {self.frames} frames used (animated or multi-page file)")
        if self.exif_orientation != 1:
            notes.append(f"EXIF orientation {self.exif_orientation} applied")
        if self.mode_conversion:
            notes.append(f"mode converted {self.mode_conversion}")
        if self.crop_box is not None:
            notes.append(f"centre-cropped to box {self.crop_box}")
        if self.padding is not None:
            notes.append(f"padded to square by {self.padding} (l,t,r,b) with {self.pad_mode}")
        if self.resized_from is not None:
            notes.append(f"resized from {self.resized_from[0]}x{self.resized_from[1]} to "
                         f"{self.resolution}x{self.resolution}")
        return notes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with ``describe()`` as ``notes``."""
        return {"exif_orientation": self.exif_orientation,
                "mode_conversion": self.mode_conversion,
                "upright_size": list(self.upright_size),
                "crop_box": list(self.crop_box) if self.crop_box else None,
                "padding": list(self.padding) if self.padding else None,
                "pad_mode": self.pad_mode,
                "resized_from": list(self.resized_from) if self.resized_from else None,
                "resolution": self.resolution,
                "frames": self.frames,
                "notes": self.describe()}


@dataclass(frozen=True, eq=False)
class NormalisedImage:
    """A square training image, its alpha (same geometry) if any, and the record of changes."""

    image: Image.Image
    alpha: Image.Image | None
    fit: SquareFit
    changes: ImageChanges = field(repr=False)


def normalise_image(loaded: LoadedImage, resolution: int, *,
                    max_crop_ratio: float = DEFAULT_MAX_CROP_RATIO,
                    pad_mode: PadMode = "edge") -> NormalisedImage:
    """Make a loaded image a centred ``resolution``² square (see the module docstring)."""
    fit = plan_square_fit(loaded.image.size, resolution, max_crop_ratio=max_crop_ratio,
                          pad_mode=pad_mode)
    side = fit.square_side
    changes = ImageChanges(
        exif_orientation=loaded.exif_orientation, mode_conversion=loaded.mode_conversion,
        upright_size=loaded.image.size, crop_box=fit.crop_box if fit.cropped else None,
        padding=fit.padding if fit.padded else None, pad_mode=pad_mode if fit.padded else None,
        resized_from=(side, side) if fit.resized else None, resolution=resolution,
        frames=loaded.frames)
    alpha = fit_mask(loaded.alpha, fit) if loaded.alpha is not None else None
    return NormalisedImage(image=fit_image(loaded.image, fit), alpha=alpha, fit=fit,
                           changes=changes)


# --------------------------------------------------------------------------- tensors

def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 tensor (3, H, W) in [-1, 1] on the CPU."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    """Tensor (3, H, W) in [-1, 1] (any float dtype and device) → RGB PIL image; clamps."""
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    scaled = ((tensor.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(scaled.permute(1, 2, 0).cpu().numpy())


def jpeg_thumbnail(data: bytes, size: int, *, quality: int = 80) -> bytes:
    """Encoded image bytes scaled (bicubic) to fit ``size`` px, as JPEG: for pages and notes.
    Raises what PIL raises for bytes it cannot decode."""
    with Image.open(io.BytesIO(data)) as image:
        thumb = image.convert("RGB")
        thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
