"""Checkpoints: the :func:`training_hash` a checkpoint (and a concept) is made under, and the
:class:`Checkpointer` callback that writes ``last.pt`` and resumes from it.

A checkpoint is :meth:`ConceptTrainer.state_dict`: learned tensors, optimizer state, step,
generator state and loss history — tensors and plain values only — so a resumed run continues
bit-identically.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eqdiff.config import MethodConfig, RunConfig, config_hash
from eqdiff.method.models import model_identity
from eqdiff.method.training.callbacks import StepResult, TrainingCallback

if TYPE_CHECKING:
    from eqdiff.method.training.trainer import ConceptTrainer

logger = logging.getLogger(__name__)


def training_hash(config: RunConfig, method: MethodConfig) -> str:
    """Hash of everything that changes a trained concept (not storage, not sampling); the base
    model enters by identity too, so weights replaced at the same path retrain."""
    return config_hash(config.model, model_identity(config.model.base_model), method,
                       config.train, config.frequency, config.masks, config.rra, config.losses)


class Checkpointer(TrainingCallback):
    """Writes ``last.pt`` every ``every`` steps (atomically) and resumes from it.

    The file holds tensors and plain values only and is read with ``weights_only=True``.
    """

    def __init__(self, folder: str | Path, every: int) -> None:
        self.folder = Path(folder)
        self.every = every

    @property
    def path(self) -> Path:
        return self.folder / "last.pt"

    def restore(self, trainer: ConceptTrainer) -> bool:
        if not self.path.is_file():
            return False
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        trainer.load_state_dict(state)
        logger.info("resumed %s from step %d", self.folder, trainer.step)
        return True

    def save(self, trainer: ConceptTrainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(trainer.state_dict(), partial)
        partial.replace(self.path)

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        if self.every and result.step % self.every == 0 and result.step < result.total_steps:
            self.save(trainer)
