"""Subject masks: latent-size masks for the mask-guided diffusion process (METHOD.md §4)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def latent_masks(masks: Tensor, latent_size: int, *, iterations: int, kernel: int) -> Tensor:
    """Pixel masks (N, 1, H, W) → dilated latent masks (N, 1, s, s) in {0, 1}, float32.

    Resized with nearest-neighbour sampling to the latent grid (its size comes from the VAE,
    never a hard-coded /8), then dilated by ``iterations`` passes of a ``kernel``×``kernel``
    max-pool (5 × 5×5 ≈ ±10 latent pixels, as released). Runs on the input's device.
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be (N, 1, H, W), got {tuple(masks.shape)}")
    grid = F.interpolate((masks > 0.5).float(), size=(latent_size, latent_size),
                         mode="nearest")
    for _ in range(iterations):
        grid = F.max_pool2d(grid, kernel_size=kernel, stride=1, padding=kernel // 2)
    return grid
