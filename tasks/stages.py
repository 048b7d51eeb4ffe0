"""Thin Prefect tasks over :mod:`eqdiff.pipeline.stages`: resolve inputs, call one function,
return keys.

Two kinds of failure are retried, each by one layer only:

- **transient storage or network trouble** inside a task (an unreachable endpoint, a dropped
  connection) is retried by Prefect, in the same worker (``retries`` below);
- **a lost worker** (the process killed, by Ray's memory monitor for instance, or its node gone)
  is retried by Ray, which alone can run the task again elsewhere: the flow gives Ray's tasks
  ``max_retries`` (:meth:`flows.compute.ComputePlan.remote_options`) and no application-error
  retries. A retried training resumes from its stored checkpoint.

A :class:`~eqdiff.pipeline.stages.StageFailed` (bad subject) or a ``ValueError`` fails at once and
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
from eqdiff.data.prompts import PromptSet
from eqdiff.method.training import LogProgress, ProgressBar
from eqdiff.pipeline import stages
from eqdiff.store.errors import is_transient
from tasks.logs import log_stages_at_info, noting_reattempts
from tasks.progress import PrefectProgress
from tasks.resources import concept_generator, scorers, task_device

logger = logging.getLogger(__name__)
log_stages_at_info()  # their lines reach the task run's page in Prefect (see tasks.logs)

def transient_only(task, task_run, state) -> bool:  # Prefect's hook signature
    """Retry condition: only transient storage and network errors are retried (by Prefect);
    a full or read-only store, refused credentials and bad data fail at once."""
    try:
        state.result()
    except Exception as error:  # noqa: BLE001 - classifying, not handling
        return is_transient(error)
    return False


COMMON = {"retries": 2, "retry_delay_seconds": [2, 10], "retry_condition_fn": transient_only,
          "cache_policy": NO_CACHE, "persist_result": False}


def _record(result: stages.StageResult) -> dict:
    return {"prefix": result.prefix, "skipped": result.skipped, **result.info}


@task(name="ingest", task_run_name="ingest · {subject.name}", **COMMON)
@noting_reattempts
def ingest(ctx: stages.RunContext, subject: Subject, prompt_set: PromptSet) -> dict:
    return _record(stages.ingest(ctx, subject, prompt_set))


@task(name="preprocess", task_run_name="preprocess · {subject}", **COMMON)
@noting_reattempts
def preprocess(ctx: stages.RunContext, subject: str) -> dict:
    return _record(stages.preprocess(ctx, subject))


@task(name="extract-masks", task_run_name="masks · {subject}", **COMMON)
@noting_reattempts
def extract_masks(ctx: stages.RunContext, subject: str) -> dict:
    with task_device() as device:
        return _record(stages.extract_masks(ctx, subject, device=device))


@task(name="class-priors", task_run_name="priors · {class_noun}", **COMMON)
@noting_reattempts
def class_priors(ctx: stages.RunContext, class_noun: str) -> dict:
    progress = PrefectProgress(f"class priors: {class_noun}")
    with task_device() as device:
        return _record(stages.class_priors(ctx, class_noun, device=device,
                                           progress=progress.update))


@task(name="train-concept", task_run_name="train · {subject} · {method.name}", **COMMON)
@noting_reattempts
def train_concept(ctx: stages.RunContext, subject: str, class_noun: str, method: MethodConfig,
                  prior_prefix: str | None) -> dict:
    description = f"training {subject}/{method.name}"
    # the artifact's bar and, in the task run's logs, a line every 50 steps or 30 s
    callbacks = [PrefectProgress(description).training_callback(), LogProgress(description)]
    if sys.stderr.isatty():  # a terminal (the local runner): a progress bar too
        callbacks.append(ProgressBar(f"{subject}/{method.name}"))
    with task_device() as device:
        return _record(stages.train(ctx, subject, class_noun, method,
                                    prior_prefix=prior_prefix, device=device,
                                    callbacks=callbacks))


@task(name="generate-samples", task_run_name="generate · {subject} · {method}", **COMMON)
@noting_reattempts
def generate_samples(ctx: stages.RunContext, subject: str, method: str,
                     prompts: list[str]) -> dict:
    progress = PrefectProgress(f"generating {subject}/{method}")

    def generator():  # ConceptGenerator, loaded only when needed
        return concept_generator(ctx.base_model, ctx.config.sample, ctx.config.rra,
                                 local_files_only=ctx.config.model.local_files_only)

    with task_device():  # the generator (cached in this worker) takes the same device
        return _record(stages.generate(ctx, generator, subject, method, prompts,
                                       progress=progress.update))


@task(name="score-subject", task_run_name="score · {subject}", **COMMON)
@noting_reattempts
def score_subject(ctx: stages.RunContext, subject: str, methods: list[str]) -> dict:
    with task_device():
        return _record(stages.score(
            ctx, lambda: scorers(ctx.config.eval,
                                 local_files_only=ctx.config.model.local_files_only),
            subject, methods))


@task(name="build-report", task_run_name="report · {ctx.run_id}", **COMMON)
@noting_reattempts
def build_report(ctx: stages.RunContext) -> dict:
    return _record(stages.report(ctx))
