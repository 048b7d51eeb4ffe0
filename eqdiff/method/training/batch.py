"""What a run trains on (:class:`ConceptData`) and what one step sees (:class:`StepDraws` on
the host, :class:`StepBatch` on the device)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from eqdiff.method.frequency import Band

# the trainer's own step inputs; any other buffer is an extension's draw
STEP_INPUTS = frozenset({"instance_indices", "band_slots", "latent_eps", "prior_indices",
                         "noise", "timesteps"})


@dataclass
class ConceptData:
    """What one subject contributes to training, as tensors on any device.

    images: (N, 3, H, W) float in [-1, 1]; masks: (N, 1, H, W) in {0, 1} at pixel size;
    prior_images: (M, 3, H, W) class images in [-1, 1] (M may be 0).

    No mask may be empty (no value above 0.5, where training binarises them): its image would
    add nothing to the instance and RRA losses. The mask stage never writes one; an all-ones
    mask trains on the whole image.
    """

    subject: str
    class_noun: str
    images: Tensor
    masks: Tensor
    prior_images: Tensor

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3 or self.images.shape[0] < 1:
            raise ValueError(f"{self.subject}: images must be (N>=1, 3, H, W), got "
                             f"{tuple(self.images.shape)}")
        if self.masks.shape != (self.images.shape[0], 1, *self.images.shape[2:]):
            raise ValueError(f"{self.subject}: masks must be (N, 1, H, W) matching the images, "
                             f"got {tuple(self.masks.shape)} for {tuple(self.images.shape)}")
        present = (self.masks.float() > 0.5).flatten(1).any(dim=1).tolist()
        empty = [index for index, found in enumerate(present) if not found]
        if empty:
            raise ValueError(f"{self.subject}: the masks of images {empty} are empty (no value "
                             "above 0.5); use an all-ones mask to train on a whole image")
        if self.prior_images.ndim != 4 or self.prior_images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"{self.subject}: prior images must be (M, 3, H, W) like the "
                             f"instance images, got {tuple(self.prior_images.shape)}")


@dataclass
class StepDraws:
    """Every random number of one step, drawn on the host in a fixed order (see
    :meth:`~eqdiff.method.training.ConceptTrainer.draw`). ``tensors`` are CPU tensors whose
    shapes are the same every step; ``bands`` names each instance row's band
    (``tensors["band_slots"]`` indexes them)."""

    bands: tuple[Band, ...]
    tensors: dict[str, Tensor]


@dataclass
class StepBatch:
    """One step's device tensors, shared with extensions (RRA reads indices, timesteps, noise
    and its own draws). They live in the trainer's step buffers, so under a CUDA graph an
    extension sees the same tensors every step.

    Rows are the Bi instance samples, then the Bp prior (class) samples.
    """

    instance_indices: Tensor  # (Bi,) long
    timesteps: Tensor  # (Bi + Bp,) long
    noise: Tensor  # (Bi + Bp, C, h, w)
    noisy_latents: Tensor  # (Bi + Bp, C, h, w)
    latent_masks: Tensor  # (Bi, 1, h, w)
    encoder_states: Tensor  # (Bi + Bp, L, D)
    instance_count: int
    prior_indices: Tensor  # (Bp,) long: which class image each prior row shows
    draws: dict[str, Tensor] = field(default_factory=dict)  # extensions' draws, on the device
