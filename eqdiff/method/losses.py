"""Mask-guided noising and the training losses of EqDiff (docs/method.md §4, §6).

Shape conventions: latents and UNet predictions are ``(B, C, h, w)``; masks are ``(B, 1, h, w)``
(or ``(B, h, w)`` where stated) with values in {0, 1} or [0, 1], any dtype including bool.
Losses are computed in float32 whatever the prediction dtype and returned as 0-d tensors on the
predictions' device. The losses never synchronise with the device (no ``.item()``), so empty
masks are handled arithmetically instead of by checks that would stall the training loop.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from eqdiff.config import InstanceNormalisation, LossConfig

LOSS_TERMS: tuple[str, ...] = ("inst", "prior", "xattn", "rra")
"""Names of the loss parts :func:`total_loss` accepts; ``"inst"`` is required."""

_MAX_EPS = 1e-12  # guards the per-sample max normalisation of attention maps


def latent_masks(masks: torch.Tensor, latent_size: int, *, iterations: int,
                 kernel: int) -> torch.Tensor:
    """Pixel masks (N, 1, H, W) → dilated latent masks (N, 1, s, s) in {0, 1}, float32.

    Resized with nearest-neighbour sampling to the latent grid (its size comes from the VAE,
    never a hard-coded /8), then dilated by ``iterations`` passes of a ``kernel``×``kernel``
    max-pool (5 × 5×5 ≈ ±10 latent pixels, as released). Runs on the input's device.
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be (N, 1, H, W), got {tuple(masks.shape)}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd number, got {kernel}")
    grid = F.interpolate((masks.float() > 0.5).float(), size=(latent_size, latent_size),
                         mode="nearest")
    for _ in range(iterations):
        grid = F.max_pool2d(grid, kernel_size=kernel, stride=1, padding=kernel // 2)
    return grid


class HasAlphasCumprod(Protocol):
    """A noise scheduler such as diffusers' ``DDPMScheduler``."""

    alphas_cumprod: Tensor


def _alphas_cumprod(source: HasAlphasCumprod | Tensor) -> Tensor:
    values = source if isinstance(source, Tensor) else getattr(source, "alphas_cumprod", None)
    if not isinstance(values, Tensor) or values.ndim != 1:
        raise TypeError("expected a scheduler with a 1-D `alphas_cumprod` tensor or that "
                        f"tensor itself, got {type(source).__name__}")
    return values


def _check_mask_for(mask: Tensor, values: Tensor, name: str) -> None:
    """``mask`` must be ``(B, 1 or C, h, w)`` for ``values`` of shape ``(B, C, h, w)``."""
    if values.ndim != 4:
        raise ValueError(f"{name} must be (B, C, h, w), got shape {tuple(values.shape)}")
    batch, channels, height, width = values.shape
    if (mask.ndim != 4 or mask.shape[0] != batch or mask.shape[1] not in (1, channels)
            or mask.shape[-2:] != (height, width)):
        raise ValueError(f"mask must be ({batch}, 1, {height}, {width}) to match {name} of "
                         f"shape {tuple(values.shape)}, got {tuple(mask.shape)}")


def masked_noising(latents: Tensor, noise: Tensor, timesteps: Tensor, mask: Tensor,
                   scheduler_or_alphas_cumprod: HasAlphasCumprod | Tensor) -> Tensor:
    """Forward diffusion inside the mask only (docs/method.md §4).

    ``z_t = M * (sqrt(a_t) * z_0 + sqrt(1 - a_t) * eps) + (1 - M) * z_0`` with ``a_t`` the
    scheduler's ``alphas_cumprod[t]``. The noisy term is computed exactly as diffusers'
    ``DDPMScheduler.add_noise`` does (``alphas_cumprod`` cast to the latents' dtype on their
    device), so an all-ones mask reproduces ``add_noise`` bit for bit. Where ``M == 0`` the
    result is ``z_0`` itself, bit-identical (selected with ``torch.where``, not computed).
    The scheduler is not modified.

    Args:
        latents: ``z_0``, ``(B, C, h, w)`` float.
        noise: ``eps``, same shape and dtype.
        timesteps: ``(B,)`` integer timesteps (any device).
        mask: ``(B, 1, h, w)`` (or ``(B, C, h, w)``) in [0, 1] or bool, broadcast over channels.
        scheduler_or_alphas_cumprod: a scheduler with ``alphas_cumprod`` or that ``(T,)`` tensor.

    Returns:
        ``z_t``, ``(B, C, h, w)`` in the latents' dtype on their device.
    """
    _check_mask_for(mask, latents, "latents")
    if noise.shape != latents.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != latents shape "
                         f"{tuple(latents.shape)}")
    if timesteps.shape != (latents.shape[0],):
        raise ValueError(f"timesteps must be ({latents.shape[0]},), got {tuple(timesteps.shape)}")
    alphas = _alphas_cumprod(scheduler_or_alphas_cumprod).to(device=latents.device,
                                                             dtype=latents.dtype)
    alpha_t = alphas[timesteps.to(latents.device)]
    broadcast = (-1,) + (1,) * (latents.ndim - 1)
    sqrt_alpha = (alpha_t**0.5).reshape(broadcast)
    sqrt_one_minus_alpha = ((1 - alpha_t) ** 0.5).reshape(broadcast)
    noisy = sqrt_alpha * latents + sqrt_one_minus_alpha * noise
    weight = mask.to(device=latents.device, dtype=latents.dtype)
    # Two products (not z_0 + M * (noisy - z_0)) so that M == 1 gives `noisy` exactly.
    blended = weight * noisy + (1 - weight) * latents
    return torch.where(weight == 0, latents, blended)


def masked_diffusion_loss(pred: Tensor, target: Tensor, mask: Tensor | None, *,
                          normalisation: InstanceNormalisation = "per-element") -> Tensor:
    """Squared error inside the mask, normalised per sample (docs/method.md §4).

    For each sample ``b`` of ``C`` channels, with ``A_b`` the mask's area (``sum(M)`` of a
    1-channel mask, the pixels it covers)::

        "per-element": L_b = sum(M * (pred - target) ** 2) / (C * A_b)
        "released":    L_b = sum(M * (pred - target) ** 2) / A_b        (C times the above)

    "per-element" is the mean squared error over the masked elements; "released" divides by
    the area alone, as the released code does, so it is ``C`` times larger (4 for SD latents)
    and the instance loss weighs that much more against the prior and auxiliary losses. The
    loss is the mean of ``L_b`` over the samples whose mask is not empty, so each instance
    image weighs the same whatever its mask size. ``mask=None`` is the whole latent (MGDP
    off): "per-element" is then the plain MSE, "released" ``C`` times it.

    A sample with an all-zero mask contributes nothing (neither to the sum nor to the count);
    if every mask is empty the loss is exactly 0 (still differentiable, zero gradient), never
    NaN. In training no mask is empty: the mask stage passes over an extractor whose mask covers
    less than ``masks.min_coverage`` of the photo (an empty one always) for the configured
    fallback and then the full mask, and :class:`~eqdiff.method.training.ConceptData` refuses
    an empty pixel mask; the dilated latent mask of a non-empty one could only be empty if
    nearest-neighbour resizing missed every one of its pixels. This function does not check,
    because that would need a device sync.

    Args:
        pred: ``(B, C, h, w)`` model output, any float dtype.
        target: same shape (the noise ``eps`` for ε-prediction).
        mask: ``(B, 1, h, w)`` or ``(B, C, h, w)`` in [0, 1] or bool; None: no mask.
        normalisation: ``LossConfig.instance_normalisation``.

    Returns:
        A 0-d float32 tensor.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if normalisation not in typing.get_args(InstanceNormalisation):
        raise ValueError(f"normalisation must be one of {typing.get_args(InstanceNormalisation)}"
                         f", got {normalisation!r}")
    squared_error = (pred.float() - target.float()).square()
    if mask is None:
        weight = torch.ones_like(squared_error)
    else:
        _check_mask_for(mask, pred, "pred")
        weight = mask.to(device=pred.device, dtype=torch.float32).expand_as(squared_error)
    dims = (1, 2, 3)
    area = weight.sum(dim=dims)  # masked elements per sample: C * sum(M) for a 1-channel mask
    if normalisation == "released":
        area = area / pred.shape[1]  # the mask's area alone
    # Where the area is 0 the numerator is 0 as well, so the clamp only avoids 0 / 0.
    per_sample = (squared_error * weight).sum(dim=dims) / area.clamp_min(
        torch.finfo(torch.float32).tiny)
    non_empty = (area > 0).sum()
    return per_sample.sum() / non_empty.clamp_min(1)


def prior_preservation_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Plain MSE on prior (class) samples, mean over all elements; 0-d float32 tensor."""
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    return F.mse_loss(pred.float(), target.float())


def _mask_batch(masks: Tensor, batch: int, name: str) -> Tensor:
    """``(B, H, W)`` or ``(B, 1, H, W)`` masks as ``(B, 1, H, W)`` float32."""
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != batch:
        raise ValueError(f"{name} must be ({batch}, H, W) or ({batch}, 1, H, W), got shape "
                         f"{tuple(masks.shape)}")
    return masks.to(torch.float32)


def cross_attention_mask_loss(attention_maps: Tensor, masks: Tensor, resolution: int) -> Tensor:
    """MSE between the placeholder token's normalised cross-attention map and the mask (§6).

    Each map is divided by its own maximum (a zero map stays zero). The masks are resized to
    ``resolution`` with area interpolation, so each cell's target is the fraction of it the
    subject covers (a sharp mask stays sharp where the sizes divide evenly).

    Args:
        attention_maps: ``(B, resolution, resolution)`` cross-attention probabilities of the
            placeholder token, already averaged over heads and layers; any float dtype.
        masks: instance masks ``(B, H, W)`` or ``(B, 1, H, W)`` at any resolution, in [0, 1].
        resolution: the maps' side (``LossConfig.xattn_resolution``, 16 by default).

    Returns:
        A 0-d float32 tensor (mean over batch and cells).
    """
    batch = attention_maps.shape[0]
    if attention_maps.shape != (batch, resolution, resolution):
        raise ValueError(f"attention_maps must be (B, {resolution}, {resolution}), got shape "
                         f"{tuple(attention_maps.shape)}")
    target = F.interpolate(_mask_batch(masks, batch, "masks").to(attention_maps.device),
                           size=(resolution, resolution), mode="area")[:, 0]
    maps = attention_maps.float()
    peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(_MAX_EPS)
    return F.mse_loss(maps / peak, target)


def _square_side(count: int, name: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"the {name} must form a square grid, got {count} tokens")
    return side


def _binary_grid(masks: Tensor, batch: int, side: int, name: str, device: torch.device) -> Tensor:
    """Masks resized (nearest-exact) to ``side x side`` and thresholded at 0.5: ``(B, side**2)``."""
    resized = F.interpolate(_mask_batch(masks, batch, name).to(device), size=(side, side),
                            mode="nearest-exact")
    return (resized > 0.5).to(torch.float32).reshape(batch, side * side)


def rra_attention_loss(attention_probs: Tensor, target_mask: Tensor,
                       reference_mask: Tensor) -> Tensor:
    """The per-layer form of the RRA loss (docs/method.md §6): the reference-attention mass
    of in-mask queries on reference-mask keys should be 1, per head.

    For sample ``b``, head ``h`` and query ``q`` inside the target mask, the mass is
    ``m = sum over keys k in the reference mask of P[b, h, q, k]`` and the sample's loss is the
    mean of ``(m - 1) ** 2`` over its in-mask queries and all heads. The loss is the mean over
    samples that have both a non-empty target and a non-empty reference mask at the attention
    resolution; samples without are skipped, and if none is left the loss is exactly 0 (never
    NaN).

    Queries and keys lie on square grids (``Nq = sq * sq``, ``Nk = sk * sk``); each mask is
    resized to its grid with nearest-exact interpolation and thresholded at 0.5, so a query or
    key either belongs to the mask or not. The mass is summed in the probabilities' dtype (no
    float32 copy of the large attention tensor), then squared in float32.

    Args:
        attention_probs: ``(B, heads, Nq, Nk)`` softmax probabilities of the RRA branch
            (queries from the trained UNet, keys from the reference bank).
        target_mask: ``(B, H, W)`` or ``(B, 1, H, W)`` mask of the noised (target) image.
        reference_mask: ``(B, H', W')`` or ``(B, 1, H', W')`` mask of the reference image.

    Returns:
        A 0-d float32 tensor.
    """
    if attention_probs.ndim != 4:
        raise ValueError("attention_probs must be (B, heads, Nq, Nk), got shape "
                         f"{tuple(attention_probs.shape)}")
    batch, heads, num_queries, num_keys = attention_probs.shape
    device = attention_probs.device
    queries = _binary_grid(target_mask, batch, _square_side(num_queries, "queries"),
                           "target_mask", device)
    keys = _binary_grid(reference_mask, batch, _square_side(num_keys, "keys"),
                        "reference_mask", device)
    mass = torch.matmul(attention_probs, keys.to(attention_probs.dtype)[:, None, :, None])
    squared_error = (mass[..., 0].float() - 1.0).square() * queries[:, None, :]
    query_count = queries.sum(dim=1)
    usable = (query_count > 0) & (keys.sum(dim=1) > 0)
    per_sample = squared_error.sum(dim=(1, 2)) / (heads * query_count).clamp_min(1)
    per_sample = torch.where(usable, per_sample, torch.zeros_like(per_sample))
    return per_sample.sum() / usable.sum().clamp_min(1)


def pooled_rra_attention_loss(attention_map: Tensor, target_mask: Tensor,
                              reference_mask: Tensor) -> Tensor:
    """The released form of the RRA loss (docs/method.md §6), on a pooled attention map.

    ``attention_map`` is the RRA attention already averaged over heads and layers. For sample
    ``b`` and query pixel ``p``, ``s(p)`` is the attention mass on the keys inside the
    reference mask, and the loss is ``MSE(s * M, M)`` with ``M`` the target mask on the query
    grid, the mean taken over every query pixel of every sample: queries outside the target
    mask add a zero error. Masks are resized to their grids with nearest-exact interpolation
    and thresholded at 0.5, as in :func:`rra_attention_loss`. No sample is skipped: one whose
    reference mask is empty has ``s = 0`` and is penalised on its whole target mask.

    Args:
        attention_map: ``(B, Nq, Nk)`` probabilities (rows sum to 1), any float dtype.
        target_mask: ``(B, H, W)`` or ``(B, 1, H, W)`` mask of the noised (target) image.
        reference_mask: ``(B, H', W')`` or ``(B, 1, H', W')`` mask of the reference image.

    Returns:
        A 0-d float32 tensor.
    """
    if attention_map.ndim != 3:
        raise ValueError("attention_map must be (B, Nq, Nk), got shape "
                         f"{tuple(attention_map.shape)}")
    batch, num_queries, num_keys = attention_map.shape
    device = attention_map.device
    queries = _binary_grid(target_mask, batch, _square_side(num_queries, "queries"),
                           "target_mask", device)
    keys = _binary_grid(reference_mask, batch, _square_side(num_keys, "keys"),
                        "reference_mask", device)
    mass = torch.matmul(attention_map.float(), keys[:, :, None])[..., 0]  # (B, Nq)
    return F.mse_loss(mass * queries, queries)


@dataclass(frozen=True)
class LossTerms:
    """The weighted total (for ``backward``) and the unweighted parts, detached, for logging."""

    total: Tensor
    terms: dict[str, Tensor]

    def stacked(self) -> tuple[tuple[str, ...], Tensor]:
        """The log names (``"loss"``, ``"loss/<name>"``, …) and their values as one detached
        ``(1 + parts,)`` float32 tensor on the losses' device (no synchronisation)."""
        names = ("loss", *(f"loss/{name}" for name in self.terms))
        values = torch.stack([self.total.detach().float(),
                              *(value.float() for value in self.terms.values())])
        return names, values

    def to_log(self) -> dict[str, float]:
        """``{"loss": total, "loss/<name>": part, ...}`` as floats (one device transfer)."""
        names, values = self.stacked()
        return dict(zip(names, values.tolist(), strict=True))


def total_loss(parts: Mapping[str, Tensor], config: LossConfig) -> LossTerms:
    """``L = L_inst + prior_weight * L_prior + xattn_weight * L_xattn + rra_weight * L_rra``.

    Args:
        parts: 0-d loss tensors by name, a subset of :data:`LOSS_TERMS` that contains
            ``"inst"``; parts a method does not use are simply absent. A part whose weight is
            0 is logged but left out of the total (so it cannot poison it with NaN).
        config: the weights.

    Returns:
        :class:`LossTerms` with the total (keeps the graph) and the detached parts.
    """
    unknown = sorted(set(parts) - set(LOSS_TERMS))
    if unknown:
        raise ValueError(f"unknown loss part(s) {unknown}; known: {list(LOSS_TERMS)}")
    if "inst" not in parts:
        raise ValueError(f"the 'inst' loss part is required, got {sorted(parts)}")
    for name, value in parts.items():
        if value.ndim != 0:
            raise ValueError(f"loss part {name!r} must be a 0-d tensor, got shape "
                             f"{tuple(value.shape)}")
    weights = {"inst": 1.0, "prior": config.prior_weight, "xattn": config.xattn_weight,
               "rra": config.rra_weight}
    total = parts["inst"]
    for name in LOSS_TERMS[1:]:
        if name in parts and weights[name] != 0:
            total = total + weights[name] * parts[name]
    return LossTerms(total=total,
                     terms={name: value.detach() for name, value in parts.items()})
