"""The loggers whose records reach the Prefect UI, and the level they log at.

Prefect ships its own loggers' records to the API; ``PREFECT_LOGGING_EXTRA_LOGGERS`` adds ours
(set for Ray workers by :mod:`flows.compute` and for local runs by the command line). Their
INFO lines (a training resuming from a checkpoint, a mask falling back, a rejected photo) are
what an operator reads on a task run's page, so they log at INFO even where the root logger
(Prefect's default: WARNING) would drop them.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

STAGE_LOGGERS = ("eqdiff", "tasks", "flows")


def log_stages_at_info() -> None:
    """Give the stage loggers level INFO unless a level was configured for them."""
    for name in STAGE_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.INFO)


def ray_attempt() -> int:
    """Which try of the current Ray task this is (1 for the first), or 0 outside a Ray task.

    Ray numbers its re-runs of a task whose worker or node was lost; it exposes the number only
    on its core worker, so a Ray version without it reads as 0 (nothing is logged)."""
    if "ray" not in sys.modules:
        return 0
    import ray

    if not ray.is_initialized():
        return 0
    core_worker = getattr(ray._private.worker.global_worker, "core_worker", None)
    number = getattr(core_worker, "get_current_task_attempt_number", None)
    return int(number()) + 1 if number is not None else 0


def noting_reattempts(function: Callable[..., T]) -> Callable[..., T]:
    """Wrap a task's function so that a re-run by Ray (its previous worker or node was lost)
    says so in the task run's log, before the stage reports what it resumes from."""

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> T:
        attempt = ray_attempt()
        if attempt > 1:
            logging.getLogger("tasks").warning(
                "%s: try %d: Ray runs this task again because the worker or node of its "
                "previous try was lost", function.__name__, attempt)
        return function(*args, **kwargs)

    return run
