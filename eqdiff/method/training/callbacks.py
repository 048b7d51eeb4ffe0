"""Side effects of a run — progress, checkpoints, validation images — are callbacks: a
:class:`TrainingCallback` sees each finished step as a :class:`StepResult`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from eqdiff.method.frequency import Band

if TYPE_CHECKING:
    from eqdiff.method.training.trainer import ConceptTrainer


@dataclass
class StepResult:
    """One finished step. The loss values stay on the device until :attr:`losses` is read."""

    step: int  # 1-based count of finished steps
    total_steps: int
    loss_names: tuple[str, ...]
    loss_values: Tensor  # (len(loss_names),) float32 on the device, detached
    bands: tuple[Band, ...]

    @property
    def losses(self) -> dict[str, float]:
        """``{"loss": total, "loss/<name>": part, ...}``; reading it synchronises the device."""
        return dict(zip(self.loss_names, self.loss_values.tolist(), strict=True))


class TrainingCallback:
    """Hooks for side effects; every method is optional."""

    def on_start(self, start_step: int, total_steps: int) -> None:
        """Called once before the first step (``start_step`` > 0 when resuming)."""

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        """Called after every optimizer step."""

    def on_end(self, trainer: ConceptTrainer) -> None:
        """Called once after the last step."""


class ProgressBar(TrainingCallback):
    """A tqdm bar with the loss of every ``loss_every``-th step (shown on a terminal, quiet in
    logs otherwise)."""

    def __init__(self, description: str, loss_every: int = 25) -> None:
        self.description = description
        self.loss_every = loss_every  # the shown loss is read (a device sync) this often
        self._bar = None

    def on_start(self, start_step: int, total_steps: int) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total_steps, initial=start_step, desc=self.description,
                         unit="step", leave=False)

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        self._bar.update(1)
        if result.step % self.loss_every == 0 or result.step == result.total_steps:
            self._bar.set_postfix(loss=f"{result.losses['loss']:.4f}")  # synchronises

    def on_end(self, trainer: ConceptTrainer) -> None:
        self._bar.close()
