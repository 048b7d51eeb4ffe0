"""The dispatcher runs each job as soon as what it needs is done (a subject is generated while
another still trains), fails what needs a failed job with that job's reason, and opens no task
runner when there is nothing to run."""

from __future__ import annotations

import time

import pytest

from flows.compute import ComputePlan
from flows.schedule import Dispatcher, Job

SPANS: dict[str, tuple[float, float]] = {}


def _work_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    @task(name="work", task_run_name="work · {name}", cache_policy=NO_CACHE,
          persist_result=False)
    def work(name: str, seconds: float, fail: str = "") -> dict:
        started = time.monotonic()
        time.sleep(seconds)
        SPANS[name] = (started, time.monotonic())
        if fail:
            raise ValueError(fail)
        return {"name": name}

    return work


def job(name: str, stage: str, seconds: float, *, needs=(), after=(), fail: str = "",
        keys=None, work=None) -> Job:
    return Job(name, stage, keys or (name,), work,
               lambda _done, n=name, s=seconds, f=fail: {"name": n, "seconds": s, "fail": f},
               needs=tuple(needs), after=tuple(after))


def test_a_subject_is_generated_and_scored_while_another_still_trains(prefect_server):
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    work = _work_task()
    opened = []

    def runner():
        opened.append(1)
        return ThreadPoolTaskRunner(max_workers=3)

    @flow(name="dispatch-probe")
    def probe():
        jobs = [job("train a", "train", 0.2, work=work),
                job("train b", "train", 3.0, work=work),
                job("train c", "train", 0.1, fail="no usable photo", work=work),
                job("generate a", "generate", 0.1, needs=["train a"], work=work),
                job("generate b", "generate", 0.1, needs=["train b"], work=work),
                job("generate c", "generate", 0.1, needs=["train c"], keys=("c/m",),
                    work=work),
                job("score a", "score", 0.1, after=["generate a"], work=work),
                job("score c", "score", 0.1, after=["generate c"], work=work)]
        return Dispatcher(ComputePlan("local"), runner).run(jobs)

    outcome = probe()
    assert opened == [1]
    # a's generation and scoring ran while b was still training
    assert SPANS["generate a"][0] < SPANS["train b"][1]
    assert SPANS["score a"][1] < SPANS["train b"][1]
    # c's training failed: its generation is not run and fails with that reason; its scoring,
    # which comes after the generation whatever its outcome, runs
    assert outcome.failed == {"train c": "train: no usable photo",
                              "c/m": "train: no usable photo"}
    assert "generate c" not in SPANS and "score c" in SPANS
    assert set(outcome.done) == {"train a", "train b", "generate a", "generate b", "score a",
                                 "score c"}
    assert outcome.done["generate a"]["generate"] == {"name": "generate a"}


def test_nothing_to_run_opens_no_task_runner_and_a_cycle_is_refused() -> None:
    def runner():
        raise AssertionError("no job: no task runner (no Ray instance) is started")

    dispatcher = Dispatcher(ComputePlan("local"), runner)
    assert dispatcher.run([]).done == {}
    with pytest.raises(ValueError, match="unknown jobs"):
        dispatcher.run([job("a", "train", 0, needs=["nowhere"])])
    with pytest.raises(ValueError, match="wait on each other"):
        dispatcher.run([job("a", "train", 0, needs=["b"]), job("b", "train", 0, needs=["a"])])
