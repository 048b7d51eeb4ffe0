"""Checkpoints: the :class:`Checkpointer` callback that writes ``last.pt`` and resumes from it.

A checkpoint is :meth:`ConceptTrainer.state_dict`: learned tensors, optimizer state, step,
generator state and loss history — tensors and plain values only — so a resumed run continues
bit-identically. It is read with ``weights_only=True`` and nothing else; a file that cannot be
resumed raises :class:`CheckpointRejected`, with a reason in this project's words (PyTorch's
own message for a refused pickle suggests turning the safe loader off, which is never right
for a checkpoint: this code writes nothing that needs it).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from eqdiff.method.training.callbacks import StepResult, TrainingCallback

if TYPE_CHECKING:
    from eqdiff.method.training.trainer import ConceptTrainer

logger = logging.getLogger(__name__)


STATE_FIELDS: dict[str, type] = {"step": int, "learned": dict, "optimizer": dict,
                                 "generator": torch.Tensor, "loss_history": list,
                                 "training_hash": str}
"""The fields of :meth:`ConceptTrainer.state_dict` and their types."""

_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


class CheckpointRejected(ValueError):
    """A checkpoint file that is not resumed: unreadable, holding more than tensors and plain
    values, of another structure, or made for another training. ``reason`` says which."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"checkpoint {path} cannot be resumed: {reason}")
        self.path, self.reason = Path(path), reason


def _load_failure(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without PyTorch's advice."""
    refused = (_REFUSED_GLOBAL.search(str(error))
               if isinstance(error, pickle.UnpicklingError) else None)
    if refused:
        return (f"it holds Python objects ({refused.group(1)}) besides tensors and plain values; "
                "a checkpoint is only read with the safe loader, since unpickling objects can "
                "run code")
    return f"it is truncated, damaged or not a PyTorch checkpoint ({type(error).__name__})"


def read_checkpoint(path: str | Path) -> dict:
    """The training state in ``path``, read with ``weights_only=True``; raises
    :class:`CheckpointRejected` if it cannot be read or is not shaped like one."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in many ways: EOFError, IndexError, ...
        raise CheckpointRejected(path, _load_failure(error)) from None
    if not isinstance(state, dict):
        raise CheckpointRejected(path, f"it holds a {type(state).__name__}, not a training state")
    wrong = [f"{name} ({kind.__name__})" for name, kind in STATE_FIELDS.items()
             if not isinstance(state.get(name), kind)]
    if wrong:
        raise CheckpointRejected(path, "it is not a training state: missing or mistyped "
                                 + ", ".join(wrong))
    if not all(isinstance(tensor, torch.Tensor) for tensor in state["learned"].values()):
        raise CheckpointRejected(path, "it is not a training state: 'learned' holds non-tensors")
    return state


class Checkpointer(TrainingCallback):
    """Writes ``last.pt`` every ``every`` steps (atomically) and resumes from it.

    The file holds tensors and plain values only and is read with ``weights_only=True``. A file
    that does not fit the trainer leaves it as it was and raises :class:`CheckpointRejected`.
    ``name`` ("subject/method") starts the log lines.
    """

    def __init__(self, folder: str | Path, every: int, *, name: str) -> None:
        self.folder = Path(folder)
        self.every = every
        self.name = name

    @property
    def path(self) -> Path:
        return self.folder / "last.pt"

    @property
    def source(self) -> str:
        """Where the checkpoint comes from, as log lines name it."""
        return str(self.path)

    def restore(self, trainer: ConceptTrainer) -> bool:
        if not self.path.is_file():
            return False
        state = read_checkpoint(self.path)
        fresh = trainer.state_dict()
        fresh["learned"] = {name: t.clone() for name, t in fresh["learned"].items()}
        try:
            trainer.load_state_dict(state)
        except (KeyError, RuntimeError, TypeError, ValueError) as error:
            trainer.load_state_dict(fresh)  # a load that failed half-way is undone
            raise CheckpointRejected(self.path, f"it does not fit this training: {error}"
                                     ) from error
        logger.info("%s: resuming from step %d of checkpoint %s", self.name, trainer.step,
                    self.source)
        return True

    def save(self, trainer: ConceptTrainer) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(trainer.state_dict(), partial)
        partial.replace(self.path)

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        if self.every and result.step % self.every == 0 and result.step < result.total_steps:
            self.save(trainer)
