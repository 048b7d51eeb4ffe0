"""Small synthetic training data shared by the trainer, RRA and speed tests."""

import torch

from eqdiff.training import ConceptData

RESOLUTION = 64


def random_concept_data(n_images: int = 3, n_prior: int = 4, seed: int = 0,
                        resolution: int = RESOLUTION) -> ConceptData:
    """Random photos in [-1, 1], a fixed rectangular subject mask, random class images."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(n_images, 3, resolution, resolution, generator=gen) * 2 - 1
    masks = torch.zeros(n_images, 1, resolution, resolution)
    masks[:, :, resolution // 4:resolution * 3 // 4, resolution * 3 // 16:resolution * 5 // 8] = 1
    prior = torch.rand(n_prior, 3, resolution, resolution, generator=gen) * 2 - 1
    return ConceptData("ball", "ball", images, masks, prior)
