"""Numeric precision of a run: the autocast dtype of its passes and the dtype its frozen
weights are held in."""

from __future__ import annotations

import torch

from eqdiff.config import RunConfig


def autocast_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA ("auto"), none (fp32) on CPU."""
    precision = config.train.precision
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def frozen_weight_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """The dtype the trainer casts frozen weights to once at set-up; None: left as loaded.

    bf16 when autocast is bf16 (``precision`` "auto" on CUDA, or "bf16") and
    ``train.frozen_weights`` is "auto": autocast would otherwise cast every frozen weight to
    bf16 on every step. fp16 autocast keeps them as loaded (an fp16 VAE/UNet can overflow).
    """
    if config.train.frozen_weights == "auto" and autocast_dtype(config, device) == torch.bfloat16:
        return torch.bfloat16
    return None
