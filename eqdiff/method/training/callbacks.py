"""Side effects of a run — progress, checkpoints, validation images — are callbacks: a
:class:`TrainingCallback` sees each finished step as a :class:`StepResult`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from eqdiff.method.frequency import Band

if TYPE_CHECKING:
    from eqdiff.method.training.trainer import ConceptTrainer

logger = logging.getLogger(__name__)


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


def _duration(seconds: float) -> str:
    """``"1h02m"``, ``"4m07s"`` or ``"12s"``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class LogProgress(TrainingCallback):
    """Progress as INFO log lines, for runs without a terminal (a Prefect task run's logs, a
    batch job's output): the first and the last step, and in between a line once
    ``every_steps`` steps or ``every_s`` seconds have passed since the last one, whichever
    comes first. A line holds the step, the loss, the speed and the time left; the loss is
    read (a device synchronisation) only for the lines logged."""

    def __init__(self, description: str, *, every_steps: int = 50, every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if every_steps < 1 or every_s <= 0:
            raise ValueError(f"LogProgress needs every_steps >= 1 and every_s > 0, got "
                             f"{every_steps} and {every_s}")
        self.description = description
        self.every_steps = every_steps
        self.every_s = every_s
        self._clock = clock
        self._start_step = 0
        self._started = 0.0
        self._last_step = 0
        self._last_time = 0.0

    def on_start(self, start_step: int, total_steps: int) -> None:
        self._start_step = self._last_step = start_step
        self._started = self._last_time = self._clock()

    def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
        now = self._clock()
        due = (result.step == self._start_step + 1 or result.step == result.total_steps
               or result.step - self._last_step >= self.every_steps
               or now - self._last_time >= self.every_s)
        if not due:
            return
        self._last_step, self._last_time = result.step, now
        rate = (result.step - self._start_step) / max(now - self._started, 1e-9)
        logger.info("%s: step %d/%d loss %.4f, %.2f steps/s, ETA %s", self.description,
                    result.step, result.total_steps, result.losses["loss"], rate,
                    _duration((result.total_steps - result.step) / rate))
