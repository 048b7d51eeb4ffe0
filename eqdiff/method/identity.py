"""What identifies a trained concept and a set of class priors: the hashes stored with them
and compared on reuse (a checkpoint resumed, a concept or prior set found done).

Light on purpose (no diffusers, no model code): a run's plan computes these for every step
before anything runs.
"""

from __future__ import annotations

from eqdiff.config import MethodConfig, RunConfig, SampleConfig, config_hash
from eqdiff.method.models import model_identity


def training_hash(config: RunConfig, method: MethodConfig) -> str:
    """Hash of everything that changes a trained concept (not storage, not sampling); the base
    model enters by identity too, so weights replaced at the same path retrain."""
    return config_hash(config.model, model_identity(config.model.base_model), method,
                       config.training(method), config.frequency, config.masks, config.rra,
                       config.losses)


def prior_hash(base_model: str, class_noun: str, *, count: int, seed: int,
               sample: SampleConfig, resolution: int) -> str:
    """Content hash naming a set of class-prior images (the cache key's last part)."""
    return config_hash({"model": model_identity(base_model), "class": class_noun,
                        "count": count, "seed": seed, "resolution": resolution,
                        "steps": sample.steps, "guidance": sample.guidance_scale,
                        "negative": sample.negative_prompt, "scheduler": "ddim"}, length=32)
