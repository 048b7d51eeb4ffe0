"""Small synthetic data shared by the tests: concept training data and random concepts."""

import copy

import torch

from eqdiff.method.concept import load_concept, save_concept
from eqdiff.method.models import load_sd_components
from eqdiff.method.reference import ReferenceBank, install_rra, rra_layer_names, rra_learned_tensors
from eqdiff.method.training import ConceptData

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


def random_reference_image(seed: int = 3, resolution: int = RESOLUTION) -> torch.Tensor:
    """A random (3, H, W) photo in [-1, 1]: the reference image RRA concepts sample with."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(3, resolution, resolution, generator=gen) * 2 - 1


def random_concept(tiny_sd, folder, *, rra, seed=0, base_model=None):
    """A concept with random (trained-looking) token, K/V and optionally RRA tensors."""
    gen = torch.Generator().manual_seed(seed)
    unet = copy.deepcopy(load_sd_components(tiny_sd, local_files_only=True).unet)
    tensors = {"eqdiff_token.vectors": torch.randn(2, 32, generator=gen)}
    for name, param in unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            tensors[f"eqdiff_kv.{name}"] = param.detach() + 0.1 * torch.randn(
                param.shape, generator=gen)
    if rra:
        handle = install_rra(unet, ReferenceBank(), rra_layer_names(unet, ("mid", "up")))
        with torch.no_grad():
            for processor in handle.installed.values():
                for param in processor.parameters():
                    param.add_(0.1 * torch.randn(param.shape, generator=gen))
                processor.to_out.bias[-1] = 0.5  # gates open
        tensors.update(rra_learned_tensors(handle))
    record = {"subject": f"ball{seed}", "class_noun": "ball", "placeholder_token": "<eqd>",
              "method": {"name": "eqdiff" if rra else "eqdiff-no-rra"}}
    save_concept(folder, tensors, record, base_model=base_model or tiny_sd)
    return load_concept(folder)
