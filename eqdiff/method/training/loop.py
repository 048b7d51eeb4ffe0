"""``train_concept``: one customization run for one subject and one method, start to end.

The loop reads top to bottom: resume from a checkpoint if there is one, then step until done,
handing every finished step to the callbacks (progress, checkpoints, validation images).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from eqdiff.config import MethodConfig, RunConfig, to_dict
from eqdiff.method.identity import training_hash
from eqdiff.method.models import SDComponents
from eqdiff.method.training.batch import ConceptData
from eqdiff.method.training.callbacks import TrainingCallback
from eqdiff.method.training.checkpoint import Checkpointer
from eqdiff.method.training.extensions import TrainingExtension
from eqdiff.method.training.trainer import ConceptTrainer


@dataclass
class TrainedConcept:
    """The learned tensors (by concept-file name) and a record of the run."""

    tensors: dict[str, Tensor]
    metadata: dict
    loss_history: list[dict[str, float]] = field(default_factory=list)


def train_concept(components: SDComponents, data: ConceptData, config: RunConfig,
                  method: MethodConfig, *, device: torch.device | str = "cpu",
                  checkpoint_dir: str | Path | None = None,
                  checkpointer: Checkpointer | None = None,
                  callbacks: Sequence[TrainingCallback] = (),
                  extensions: Sequence[TrainingExtension] = (),
                  stop_after: int | None = None) -> TrainedConcept:
    """Train one concept; resume from ``checkpoint_dir`` when it holds a checkpoint.

    ``extensions`` are the ones the caller supplies (RRA:
    :func:`eqdiff.method.reference.training_extensions`); a method that needs one it lacks is
    refused before ``components`` are touched. ``checkpointer`` replaces the default file
    checkpointer of ``checkpoint_dir`` (e.g. one that also keeps the file in the artifact store).

    ``components`` are modified in place (token added, processors installed, then removed):
    load a fresh copy per concept. ``stop_after`` ends the run early after that many steps in
    total (used to simulate an interruption in tests).
    """
    started = time.perf_counter()
    trainer = ConceptTrainer(components, data, config, method, device=device,
                             extensions=extensions)
    callbacks = list(callbacks)
    if checkpointer is None and checkpoint_dir is not None:
        checkpointer = Checkpointer(checkpoint_dir, config.train.checkpoint_every,
                                    name=f"{data.subject}/{method.name}")
    if checkpointer is not None:
        checkpointer.restore(trainer)
        callbacks.append(checkpointer)
    start = trainer.step
    last = trainer.total_steps if stop_after is None else min(stop_after, trainer.total_steps)
    try:
        for callback in callbacks:
            callback.on_start(start, trainer.total_steps)
        while trainer.step < last:
            result = trainer.train_step()
            for callback in callbacks:
                callback.on_step(result, trainer)
        if checkpointer is not None and trainer.step < trainer.total_steps:
            checkpointer.save(trainer)
        for callback in callbacks:
            callback.on_end(trainer)
        metadata = {
            "subject": data.subject, "class_noun": data.class_noun, "method": to_dict(method),
            "placeholder_token": config.train.placeholder_token,
            "training_hash": training_hash(config, method), "steps": trainer.step,
            "resumed_from_step": start, "seconds": round(time.perf_counter() - started, 3),
            "device": str(trainer.device), "instance_images": int(data.images.shape[0]),
        }
        return TrainedConcept(trainer.learned_tensors(), metadata, trainer.loss_history)
    finally:
        trainer.remove()
