"""Frequency decomposition of concept images and per-sample band sampling (docs/method.md §2).

Conventions used throughout:

- Spectra are *centred* (``torch.fft.fftshift`` order): the zero frequency of an ``n``-pixel
  axis sits at index ``n // 2`` and index ``i`` holds bin ``k = i - n // 2``.
- Cutoffs are fractions of the half-spectrum, per axis: bin ``k`` of an ``n``-pixel axis has the
  normalised frequency ``f = k / (n / 2)`` (1.0 = Nyquist). The released filters (|u|,|v| < 50
  bins low-pass, < 5 bins removed by the high-pass, at 512 px) are cutoffs 50/256 and 5/256, and
  the same fractions keep the same part of the spectrum at any resolution.
- Images are ``(B, C, H, W)`` floats in [-1, 1] (``C = 3`` for RGB) on any device. The FFT runs
  in at least float32 (bf16/fp16 are promoted, float64 stays float64); results come back in the
  input dtype on the input device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from functools import lru_cache
from typing import Literal, get_args

import torch
from torch import Tensor

from eqdiff.config import FilterShape, FrequencyConfig

FilterKind = Literal["low", "high"]

_FILTER_SHAPES: tuple[str, ...] = get_args(FilterShape)
_FILTER_KINDS: tuple[str, ...] = get_args(FilterKind)


class Band(StrEnum):
    """The band a training sample is shown in: LF image, HF image, or the original RGB image."""

    LOW = "low"
    HIGH = "high"
    FULL = "full"


BAND_ORDER: tuple[Band, ...] = (Band.LOW, Band.HIGH, Band.FULL)
"""The bands in the order of ``FrequencyConfig``'s probabilities (``p_low, p_high, p_full``)."""


def _centred_bins(n: int) -> Tensor:
    """Bin index of each position of a centred ``n``-point spectrum, ``(n,)`` float64 on CPU."""
    return torch.arange(n, dtype=torch.float64) - n // 2


def _build_low_pass(height: int, width: int, cutoff: float, shape: str, order: int) -> Tensor:
    """The centred low-pass gain ``(H, W)`` float64 on CPU (see :func:`band_filter`)."""
    bins_u = _centred_bins(height)
    bins_v = _centred_bins(width)
    if shape == "box":
        # Compared in bins so that the released "< 50 bins" is exact at 512 px.
        keep_u = bins_u.abs() < cutoff * (height / 2)
        keep_v = bins_v.abs() < cutoff * (width / 2)
        return (keep_u[:, None] & keep_v[None, :]).to(torch.float64)
    freq_u = bins_u / (height / 2)
    freq_v = bins_v / (width / 2)
    ratio_sq = (freq_u[:, None].square() + freq_v[None, :].square()) / cutoff**2
    if shape == "gaussian":
        return torch.exp(-math.log(2.0) * ratio_sq)
    return 1.0 / (1.0 + ratio_sq.pow(order))  # butterworth: (r / c) ** (2 * order)


@lru_cache(maxsize=32)
def _cached_filter(height: int, width: int, cutoff: float, kind: str, shape: str, order: int,
                   device: torch.device, dtype: torch.dtype) -> Tensor:
    """Shared, read-only filter tensor; only this module uses it, and never writes to it."""
    low = _build_low_pass(height, width, cutoff, shape, order)
    gain = low if kind == "low" else 1.0 - low
    return gain.to(device=device, dtype=dtype)


def _filter_for(height: int, width: int, *, cutoff: float, kind: str, shape: str, order: int,
                device: torch.device, dtype: torch.dtype) -> Tensor:
    """Validate the arguments and return the cached (read-only) filter."""
    if not (isinstance(height, int) and isinstance(width, int) and height >= 1 and width >= 1):
        raise ValueError(f"filter size must be positive integers, got {height}x{width}")
    if not (cutoff > 0 and math.isfinite(cutoff)):
        raise ValueError(f"cutoff must be a finite number > 0, got {cutoff!r}")
    if kind not in _FILTER_KINDS:
        raise ValueError(f"kind must be one of {list(_FILTER_KINDS)}, got {kind!r}")
    if shape not in _FILTER_SHAPES:
        raise ValueError(f"shape must be one of {list(_FILTER_SHAPES)}, got {shape!r}")
    if shape == "butterworth" and not (isinstance(order, int) and order >= 1):
        raise ValueError(f"butterworth order must be an integer >= 1, got {order!r}")
    # The order only matters for butterworth: normalise it so the cache does not split.
    order = order if shape == "butterworth" else 0
    return _cached_filter(height, width, float(cutoff), kind, shape, order,
                          torch.device(device), dtype)


def band_filter(height: int, width: int, *, cutoff: float, kind: FilterKind,
                shape: FilterShape, order: int = 2, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
    """A centred-spectrum gain mask ``(height, width)`` in ``dtype`` on ``device`` (default CPU).

    With ``f_u = k_u / (H / 2)`` and ``f_v = k_v / (W / 2)`` the normalised frequencies of bins
    ``(k_u, k_v)`` and ``c = cutoff``, the low-pass gain is:

    - ``box``: 1 where ``max(|f_u|, |f_v|) < c`` (a square in normalised units — for a square
      image, the square ``|k_u|, |k_v| < c * n / 2`` in bins), else 0. At 512 px, ``c = 50/256``
      keeps exactly ``|k_u|, |k_v| < 50``.
    - ``gaussian``: ``exp(-ln 2 * (r / c) ** 2)`` with ``r = sqrt(f_u**2 + f_v**2)``.
    - ``butterworth``: ``1 / (1 + (r / c) ** (2 * order))``.

    So for both smooth shapes ``c`` is the half-gain radius (gain 0.5 at ``r = c``) and the DC
    gain is 1. The high-pass is ``1 - low`` for every shape, so low + high = identity.

    Returns a fresh tensor the caller may modify (built once per arguments and cached; the
    cache is never handed out).

    Raises:
        ValueError: a non-positive size or cutoff, or an unknown ``kind``/``shape``/``order``.
    """
    device = torch.device("cpu") if device is None else device
    return _filter_for(height, width, cutoff=cutoff, kind=kind, shape=shape, order=order,
                       device=device, dtype=dtype).clone()


def filter_images(images: Tensor, mask: Tensor) -> Tensor:
    """Multiply the centred 2-D spectrum of each image by ``mask`` and transform back.

    Args:
        images: real ``(..., H, W)`` floats on any device.
        mask: centred gain ``(H, W)`` (as :func:`band_filter` returns), moved to the images'
            device.

    Returns:
        The complex inverse transform ``(..., H, W)``, unclamped: complex64 for float32 and
        lower-precision inputs, complex128 for float64 inputs. Real part and modulus are the
        ``"real"`` and ``"abs"`` band outputs before clamping.
    """
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    if mask.shape != images.shape[-2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the image size "
                         f"{tuple(images.shape[-2:])}")
    compute_dtype = torch.promote_types(images.dtype, torch.float32)
    spectrum = torch.fft.fftshift(torch.fft.fft2(images.to(compute_dtype)), dim=(-2, -1))
    spectrum = spectrum * mask.to(device=images.device, dtype=compute_dtype)
    return torch.fft.ifft2(torch.fft.ifftshift(spectrum, dim=(-2, -1)))


def _check_images(images: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")


def frequency_band(images: Tensor, band: Band | Literal["low", "high"],
                   config: FrequencyConfig) -> Tensor:
    """The low- or high-frequency version of instance images (docs/method.md §2).

    Grayscale first when ``config.grayscale_bands`` (channel mean, repeated to all ``C``
    channels); then the centred 2-D FFT in at least float32, the ``config.filter_shape`` mask
    (low band: ``low_cutoff`` low-pass; high band: ``high_cutoff`` high-pass), the inverse FFT,
    and the real part (``band_output="real"``) or modulus (``"abs"``, the released behaviour),
    clamped to [-1, 1].

    Only instance (concept) images are ever given to this function; prior/class images are
    never filtered.

    Args:
        images: ``(B, C, H, W)`` in [-1, 1], any float dtype, any device.
        band: ``"low"`` or ``"high"`` (the full band is the unfiltered image, see
            :func:`apply_bands`).
        config: cutoffs, filter shape, grayscale and output switches.

    Returns:
        A new ``(B, C, H, W)`` tensor in the input dtype on the input device, in [-1, 1]
        (in [0, 1] for ``"abs"``).
    """
    _check_images(images)
    band = Band(band)
    if band is Band.FULL:
        raise ValueError("frequency_band filters 'low' or 'high'; the 'full' band is the "
                         "unfiltered image (use apply_bands)")
    compute_dtype = torch.promote_types(images.dtype, torch.float32)
    pixels = images.to(compute_dtype)
    if config.grayscale_bands:
        pixels = pixels.mean(dim=1, keepdim=True)
    height, width = images.shape[-2:]
    mask = _filter_for(
        height, width,
        cutoff=config.low_cutoff if band is Band.LOW else config.high_cutoff,
        kind=band.value, shape=config.filter_shape, order=config.butterworth_order,
        device=images.device, dtype=compute_dtype,
    )
    filtered = filter_images(pixels, mask)
    values = filtered.real if config.band_output == "real" else filtered.abs()
    values = values.clamp(-1.0, 1.0).to(images.dtype)
    if config.grayscale_bands:
        values = values.repeat(1, images.shape[1], 1, 1)
    return values


def sample_bands(batch_size: int, config: FrequencyConfig,
                 generator: torch.Generator) -> tuple[Band, ...]:
    """Draw one band per instance sample with probabilities ``p_low``/``p_high``/``p_full``.

    Draws come only from ``generator`` (reproducible; checkpoint it with
    ``generator.get_state()``); a band with probability 0 is never drawn.

    Returns:
        ``batch_size`` bands, in sample order.
    """
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    probabilities = torch.tensor([config.p_low, config.p_high, config.p_full],
                                 dtype=torch.float64, device=generator.device)
    draws = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
    return tuple(BAND_ORDER[index] for index in draws.tolist())


def apply_bands(images: Tensor, bands: Sequence[Band | str],
                config: FrequencyConfig) -> Tensor:
    """Per-sample band images: sample ``i`` becomes ``frequency_band(images[i], bands[i])``.

    Only for instance (concept) images — prior/class images are never filtered, so the trainer
    passes them around this function. ``"full"`` samples are returned unchanged (RGB).

    Args:
        images: ``(B, C, H, W)`` in [-1, 1], any float dtype, any device (not modified).
        bands: ``B`` bands, e.g. from :func:`sample_bands`.
        config: see :func:`frequency_band`.

    Returns:
        A new ``(B, C, H, W)`` tensor in the input dtype on the input device.
    """
    _check_images(images)
    bands = [Band(band) for band in bands]
    if len(bands) != images.shape[0]:
        raise ValueError(f"got {len(bands)} bands for a batch of {images.shape[0]} images")
    result = images.clone()
    for band in (Band.LOW, Band.HIGH):
        indices = [i for i, drawn in enumerate(bands) if drawn is band]
        if indices:
            index = torch.tensor(indices, device=images.device)
            result[index] = frequency_band(images[index], band, config)
    return result
