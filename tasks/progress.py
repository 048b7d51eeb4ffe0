"""Progress of long tasks as Prefect progress artifacts (visible in the UI while they run).

A training's log lines (step, loss, speed, time left) come from
:class:`eqdiff.method.training.LogProgress`, which the training task adds beside this."""

from __future__ import annotations

import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from eqdiff.method.training import ConceptTrainer, StepResult, TrainingCallback


class PrefectProgress:
    """One progress artifact, updated at most every ``interval`` seconds (and at the end)."""

    def __init__(self, description: str, *, interval: float = 2.0) -> None:
        self.description = description
        self.interval = interval
        self._artifact_id = None
        self._last = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self._last < self.interval:
            return
        self._last = now
        percent = 100.0 * done / max(total, 1)
        if self._artifact_id is None:
            self._artifact_id = create_progress_artifact(percent,
                                                         description=self.description)
        else:
            update_progress_artifact(self._artifact_id, percent)

    def training_callback(self) -> TrainingCallback:
        progress = self

        class _Callback(TrainingCallback):
            def on_start(self, start_step: int, total_steps: int) -> None:
                progress.update(start_step, total_steps)

            def on_step(self, result: StepResult, trainer: ConceptTrainer) -> None:
                progress.update(result.step, result.total_steps)

        return _Callback()
