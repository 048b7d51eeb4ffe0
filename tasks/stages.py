"""Thin Prefect tasks over :mod:`eqdiff.pipeline.stages`: resolve inputs, call one function,
return keys.

Retries are for transient trouble only (storage or network hiccups, a lost Ray worker);
a :class:`~eqdiff.pipeline.stages.StageFailed` (bad subject) or a ``ValueError`` fails at once and
is reported. Prefect's own result caching is off: the stages' completion markers in the store
decide what is already done.
"""

from __future__ import annotations

import logging
import sys

from prefect import task
from prefect.cache_policies import NO_CACHE

from eqdiff.config import MethodConfig
from eqdiff.data.datasets import Subject
from eqdiff.method.training import ProgressBar
from eqdiff.pipeline import stages
from eqdiff.store import StorageUnavailableError
from tasks.progress import PrefectProgress
from tasks.resources import concept_generator, scorers, task_device

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StorageUnavailableError, ConnectionError,
                                                     TimeoutError)


def _lost_worker(error: BaseException) -> bool:
    try:
        from ray.exceptions import NodeDiedError, WorkerCrashedError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return isinstance(error, WorkerCrashedError | NodeDiedError)


def transient_only(task, task_run, state) -> bool:  # Prefect's hook signature
    """Retry condition: only storage/network errors and lost Ray workers are retried."""
    try:
        state.result()
    except TRANSIENT_ERRORS:
        return True
    except Exception as error:  # classifying, not handling
        return _lost_worker(error)
    return False


COMMON = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": transient_only,
          "cache_policy": NO_CACHE, "persist_result": False}


def _record(result: stages.StageResult) -> dict:
    return {"prefix": result.prefix, "skipped": result.skipped, **result.info}


@task(name="preprocess", **COMMON)
def preprocess(ctx: stages.RunContext, subject: Subject) -> dict:
    return _record(stages.preprocess(ctx, subject))


@task(name="extract-masks", **COMMON)
def extract_masks(ctx: stages.RunContext, subject: Subject) -> dict:
    with task_device() as device:
        return _record(stages.extract_masks(ctx, subject, device=device))


@task(name="class-priors", **COMMON)
def class_priors(ctx: stages.RunContext, class_noun: str) -> dict:
    progress = PrefectProgress(f"class priors: {class_noun}")
    with task_device() as device:
        return _record(stages.class_priors(ctx, class_noun, device=device,
                                           progress=progress.update))


@task(name="train-concept", **COMMON)
def train_concept(ctx: stages.RunContext, subject: str, class_noun: str, method: MethodConfig,
                  prior_prefix: str | None) -> dict:
    progress = PrefectProgress(f"training {subject}/{method.name}")
    callbacks = [progress.training_callback()]
    if sys.stderr.isatty():  # a terminal (the local runner): a progress bar too
        callbacks.append(ProgressBar(f"{subject}/{method.name}"))
    with task_device() as device:
        return _record(stages.train(ctx, subject, class_noun, method,
                                    prior_prefix=prior_prefix, device=device,
                                    callbacks=callbacks))


@task(name="generate-samples", **COMMON)
def generate_samples(ctx: stages.RunContext, subject: Subject, method: str,
                    prompts: list[str]) -> dict:
    progress = PrefectProgress(f"generating {subject.name}/{method}")

    def generator():  # ConceptGenerator, loaded only when needed
        return concept_generator(ctx.base_model, ctx.config.sample, ctx.config.rra,
                                 local_files_only=ctx.config.model.local_files_only)

    with task_device():  # the generator (cached in this worker) takes the same device
        return _record(stages.generate(ctx, generator, subject, method, prompts,
                                       progress=progress.update))


@task(name="score-subject", **COMMON)
def score_subject(ctx: stages.RunContext, subject: Subject, methods: list[str]) -> dict:
    with task_device():
        return _record(stages.score(ctx, lambda: scorers(ctx.config.eval), subject, methods))


@task(name="build-report", **COMMON)
def build_report(ctx: stages.RunContext) -> dict:
    return _record(stages.report(ctx))
