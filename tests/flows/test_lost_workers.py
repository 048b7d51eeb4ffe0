"""A Ray worker killed in the middle of a task (an OOM kill, a crash): Ray runs the task again
up to the configured number of times, and after the last try the flow records the unit as
failed with the reason, marks its Prefect task run Crashed and finishes the other units."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.compute import DEFAULT_LOST_WORKER_RETRIES, ComputePlan

PROBE = """
import json, os, signal, sys, time
from pathlib import Path

from prefect import flow, task
from prefect_ray.task_runners import RayTaskRunner

from flows.compute import plan_compute
from flows.schedule import Dispatcher, Job
from tasks.logs import noting_reattempts

marks = Path(sys.argv[1])


def killed_on_tries(name, deadly):
    # count this try in a file; SIGKILL the worker (what the OOM killer does) on a deadly one
    mark = marks / name
    tries = (int(mark.read_text()) if mark.exists() else 0) + 1
    mark.write_text(str(tries))
    if tries in deadly:
        time.sleep(3)  # long enough for the server to hear that the task run is Running
        os.kill(os.getpid(), signal.SIGKILL)
    return tries


@task(name="dies-once")
@noting_reattempts
def dies_once():
    return killed_on_tries("once", deadly={1})


@task(name="always-dies")
def always_dies():
    return killed_on_tries("always", deadly={1, 2, 3})


@task(name="fine")
def fine():
    return "ok"


plan = plan_compute("ray", lost_worker_retries=1)


@flow(name="lost-worker-probe")
def probe():
    jobs = [Job(name, "probe", (name,), task, lambda _results: {}, gpu=False)
            for name, task in (("once", dies_once), ("always", always_dies), ("fine", fine))]
    dispatcher = Dispatcher(plan, RayTaskRunner)
    outcome = dispatcher.run(jobs)
    return {"done": {k: v["probe"] for k, v in outcome.done.items()},
            "failed": outcome.failed,
            "task_runs": {k: str(v) for k, v in dispatcher.task_runs.items()}}


result = probe()
import ray
ray.shutdown()
sys.stdout.write("PROBE " + json.dumps(result) + "\\n")
"""


def test_ray_reruns_lost_workers_a_bounded_number_of_times_only() -> None:
    plan = ComputePlan("ray", lost_worker_retries=3)
    assert plan.remote_options(gpu=False)["max_retries"] == 3
    assert plan.remote_options(gpu=False)["retry_exceptions"] is False
    assert ComputePlan("ray").remote_options()["max_retries"] == DEFAULT_LOST_WORKER_RETRIES


@pytest.mark.ray
@pytest.mark.operations
def test_a_lost_worker_is_retried_then_recorded_and_the_others_finish(prefect_server,
                                                                        tmp_path) -> None:
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_AUTH_MODE": "disabled",
           "EQDIFF_RAY_NUM_CPUS": "2", "PYTHONPATH": str(Path(__file__).parents[2])}
    marks = tmp_path / "marks"
    marks.mkdir()
    done = subprocess.run([sys.executable, "-c", PROBE, str(marks)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("PROBE "))

    # killed once, run again by Ray on a new worker: done on its second try
    assert result["done"]["once"] == 2 and (marks / "once").read_text() == "2"
    assert result["done"]["fine"] == "ok"
    # killed on both of its tries (1 + lost_worker_retries=1): failed, with Ray's reason
    assert set(result["failed"]) == {"always"}
    assert "lost its worker" in result["failed"]["always"]
    assert (marks / "always").read_text() == "2"

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        states = {name: client.read_task_run(task_run).state
                  for name, task_run in result["task_runs"].items()}
        from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

        deadline = time.monotonic() + 30  # logs reach the server in batches
        while True:
            logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(
                any_=[result["task_runs"]["once"]])))
            lines = [log.message for log in logs]
            if any("try 2: Ray runs this task again" in line for line in lines):
                break
            assert time.monotonic() < deadline, lines
            time.sleep(1)
    assert states["always"].is_crashed(), states["always"]
    assert states["once"].is_completed() and states["fine"].is_completed()
