"""Dispatching a run's jobs as soon as what each one needs has finished.

A run is a graph: a subject's masks need its preprocessing, a concept needs its subject's
masks (and its class priors), its samples need the concept, a subject's scores need its
samples. Jobs are submitted to the task runner the moment their needs are settled, so a
subject whose concepts are trained is generated and scored while other subjects still train;
no stage waits for the slowest subject. The task runner (a Ray instance, for Ray) is opened
at the first submission: a run with nothing to do starts none.

A failed job fails what needs it, with its reason; everything else goes on.
"""

from __future__ import annotations

import contextlib
import logging
import queue
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import PrefectFuture

from flows.compute import ComputePlan

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What a run finished (records by key and stage) and what failed (reasons by key).

    Keys are subject names, class nouns, or ``subject/method``.
    """

    done: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def record(self, key: str, stage: str, result: dict) -> None:
        self.done.setdefault(key, {})[stage] = result

    def merge(self, other: Outcome) -> None:
        for key, records in other.done.items():
            self.done.setdefault(key, {}).update(records)
        self.failed.update(other.failed)


@dataclass(frozen=True)
class Job:
    """One task to run once the jobs it ``needs`` are done and the jobs it comes ``after``
    have finished, done or failed (scoring the methods of a subject that were generated).
    A failed need fails the job with the need's reason.

    ``parameters`` builds the task's parameters from the results of the jobs it needs or
    comes after that are done. ``keys`` are the outcome keys its result or failure is
    recorded under.
    """

    name: str
    stage: str
    keys: tuple[str, ...]
    task: Any
    parameters: Callable[[Mapping[str, dict]], dict]
    needs: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    gpu: bool = True


def error_text(error: BaseException) -> str:
    """An error's first line (its type when it has no message), at most 500 characters."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:500]


class Dispatcher:
    """Runs :class:`Job`\\ s on the compute plan's task runner as their needs finish."""

    def __init__(self, plan: ComputePlan, open_runner: Callable[[], Any]) -> None:
        self.plan = plan
        self._open_runner = open_runner
        self._runner: Any = None
        self.task_runs: dict[str, Any] = {}  # job name -> the id of its task run

    def run(self, jobs: list[Job]) -> Outcome:
        """Run every job (or fail it with the reason of the need that failed); the outcome."""
        outcome = Outcome()
        names = {job.name for job in jobs}
        missing = {other for job in jobs for other in job.needs + job.after} - names
        if missing:
            raise ValueError(f"jobs need unknown jobs: {sorted(missing)}")
        _refuse_cycles(jobs)
        if not jobs:
            return outcome
        waiting = {job.name: job for job in jobs}
        results: dict[str, dict] = {}
        failures: dict[str, str] = {}
        finished: queue.Queue[str] = queue.Queue()
        running: dict[str, tuple[Job, PrefectFuture]] = {}
        progress = create_progress_artifact(0.0, description=f"{len(jobs)} job(s) to run")
        with self._runner_scope():
            while waiting or running:
                for job in list(waiting.values()):
                    ready = self._ready(job, results, failures)
                    if ready is None:
                        continue
                    del waiting[job.name]
                    if isinstance(ready, str):  # a need failed
                        self._fail(job, ready, outcome, failures)
                        continue
                    parameters = job.parameters({n: results[n] for n in job.needs + job.after
                                                 if n in results})
                    future = self._submit(job, parameters)
                    self.task_runs[job.name] = future.task_run_id
                    running[job.name] = (job, future)
                    future.add_done_callback(lambda _f, name=job.name: finished.put(name))
                if not running:  # what failed above may have made others ready
                    continue
                job, future = running.pop(finished.get())
                self._settle(job, future, outcome, results, failures)
                update_progress_artifact(progress, 100.0 * (len(results) + len(failures))
                                         / len(jobs))
        update_progress_artifact(progress, 100.0)
        return outcome

    @staticmethod
    def _ready(job: Job, results: Mapping[str, dict], failures: Mapping[str, str]
               ) -> bool | str | None:
        """``True`` to submit, a reason to fail it, ``None`` to keep waiting."""
        if any(other not in results and other not in failures
               for other in job.needs + job.after):
            return None
        failed = [failures[need] for need in job.needs if need in failures]
        return failed[0] if failed else True

    @contextlib.contextmanager
    def _runner_scope(self) -> Iterator[None]:
        try:
            yield
        finally:
            if self._runner is not None:
                runner, self._runner = self._runner, None
                runner.__exit__(None, None, None)

    def _submit(self, job: Job, parameters: dict) -> PrefectFuture:
        if self._runner is None:
            runner = self._open_runner()
            runner.__enter__()
            self._runner = runner
        if self.plan.target == "ray":
            from prefect_ray.context import remote_options

            with remote_options(**self.plan.remote_options(gpu=job.gpu)):
                return self._runner.submit(job.task, parameters)
        return self._runner.submit(job.task, parameters)

    @staticmethod
    def _fail(job: Job, reason: str, outcome: Outcome, failures: dict[str, str]) -> None:
        failures[job.name] = reason
        for key in job.keys:
            outcome.failed.setdefault(key, reason)

    def _settle(self, job: Job, future: PrefectFuture, outcome: Outcome,
                results: dict[str, dict], failures: dict[str, str]) -> None:
        """Record a finished job. A task whose Ray worker or node was lost after its last retry
        comes back as a crashed state (Ray's error as the reason); its task run, which the dead
        worker left Running, is marked Crashed too."""
        future.wait()
        result = future.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            reason = error_text(result)
            if future.state.is_crashed():
                reason = crash_reason(result)
                mark_crashed(future, reason)
            get_run_logger().error("%s failed: %s", job.name, reason)
            self._fail(job, f"{job.stage}: {reason}", outcome, failures)
            return
        results[job.name] = result
        for key in job.keys:
            outcome.record(key, job.stage, result)


def _refuse_cycles(jobs: list[Job]) -> None:
    """Jobs that wait on each other would never run: refused before anything starts."""
    waits = {job.name: set(job.needs + job.after) for job in jobs}
    while True:
        free = {name for name, others in waits.items() if not others}
        if not free:
            break
        waits = {name: others - free for name, others in waits.items() if name not in free}
    if waits:
        raise ValueError(f"jobs wait on each other: {sorted(waits)}")


def crash_reason(error: BaseException) -> str:
    """Why a task came back crashed: its worker or node was lost (Ray's own errors), or it
    raised before Prefect could run it in the worker (Ray wraps that in ``RayTaskError``)."""
    cause = getattr(error, "cause", None)
    if cause is not None:  # RayTaskError: the worker ran and raised
        return f"failed in its Ray worker: {type(cause).__name__}: {error_text(cause)}"
    return f"lost its worker: {error_text(error)}"


def mark_crashed(future: PrefectFuture, reason: str) -> None:
    """Record in Prefect that a task run's worker died (it cannot say so itself)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        try:
            client.set_task_run_state(future.task_run_id, Crashed(message=reason), force=True)
        except (ObjectNotFound, PrefectHTTPStatusError) as error:
            # the worker died before the server heard of its task run: nothing is left Running
            if getattr(getattr(error, "response", None), "status_code", 404) != 404:
                raise
