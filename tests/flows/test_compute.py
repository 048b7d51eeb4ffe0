"""Sizing of Ray task requests (whole GPUs, shared GPUs, CPU fallback), and GPU workers kept
between tasks, each task on the GPU Ray assigned it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.compute import ComputePlan, gpu_request
from flows.params import CustomizeParams
from tasks.resources import VisibleDevices, choose_device, cuda_index


def test_gpu_request_shares_a_gpu_only_where_the_cluster_has_one() -> None:
    assert gpu_request(1.0, cluster_gpus=4) == 1.0
    assert gpu_request(0.5, cluster_gpus=1) == 0.5  # two subjects per GPU
    assert gpu_request(0.25, cluster_gpus=0) == 0.0  # no GPU: the task runs on CPU
    assert gpu_request(2.0, cluster_gpus=1) == 0.0  # never a request that waits forever
    with pytest.raises(ValueError, match=">= 0"):
        gpu_request(-1.0, cluster_gpus=1)


def test_an_autoscaling_cluster_gets_gpu_requests_before_any_gpu_is_up() -> None:
    assert gpu_request(1.0, cluster_gpus=0, expect_gpus=True) == 1.0
    assert gpu_request(0.5, cluster_gpus=0, expect_gpus=True) == 0.5
    plan = ComputePlan("ray", gpus_per_task=gpu_request(1.0, 0, expect_gpus=True))
    assert plan.remote_options()["num_gpus"] == 1.0 and plan.device == "cuda"
    assert "num_gpus" not in plan.remote_options(gpu=False)  # CPU stages still ask for none


def test_a_local_folder_store_is_refused_on_a_cluster_of_several_nodes() -> None:
    from eqdiff.config import StorageConfig
    from flows.compute import TopologyError, check_topology

    cluster = ComputePlan("ray", address="head:6379", nodes=3)
    with pytest.raises(TopologyError, match=r"3 nodes.*'./artifacts'.*s3://.*storage_shared"):
        check_topology(cluster, StorageConfig(url="./artifacts"))
    with pytest.raises(TopologyError):
        check_topology(cluster, StorageConfig(url="file:///data/artifacts"))
    check_topology(cluster, StorageConfig(url="s3://bucket/eqdiff"))
    check_topology(cluster, StorageConfig(url="/nfs/artifacts", shared=True))
    check_topology(ComputePlan("ray", nodes=1), StorageConfig(url="./artifacts"))
    check_topology(ComputePlan("local"), StorageConfig(url="./artifacts"))


def test_a_shared_gpu_plan_asks_ray_for_the_fraction() -> None:
    plan = ComputePlan("ray", gpus_per_task=0.5, cluster_gpus=1.0)
    assert plan.remote_options() == {"num_cpus": 1.0, "num_gpus": 0.5, "max_calls": 0,
                                     "max_retries": 2, "retry_exceptions": False}
    assert plan.device == "cuda"
    assert ComputePlan("ray").remote_options() == {"num_cpus": 1.0, "max_retries": 2,
                                                   "retry_exceptions": False}
    assert ComputePlan("ray").device == "cpu"
    assert ComputePlan("local").remote_options() == {}


def test_only_stages_that_run_a_model_hold_a_gpu() -> None:
    """Preprocessing and classic masks ask Ray for no GPU on a GPU cluster; learned masks do."""
    from eqdiff.config import MaskConfig, RunConfig
    from flows.customize import masks_run_a_model

    plan = ComputePlan("ray", gpus_per_task=1.0, cluster_gpus=4.0)
    assert "num_gpus" not in plan.remote_options(gpu=False)
    assert plan.remote_options()["num_gpus"] == 1.0
    assert not masks_run_a_model(RunConfig())  # GrabCut by default
    assert not masks_run_a_model(RunConfig(masks=MaskConfig(extractor="provided")))
    assert masks_run_a_model(RunConfig(masks=MaskConfig(extractor="clipseg")))
    assert masks_run_a_model(RunConfig(masks=MaskConfig(extractor="grounded-sam")))


def test_gpus_per_subject_is_validated_and_does_not_change_the_run_id() -> None:
    assert CustomizeParams(gpus_per_subject=0.5).derived_run_id() == \
        CustomizeParams().derived_run_id()
    assert CustomizeParams(expect_gpus=True, lost_worker_retries=5,
                           storage_shared=True).derived_run_id() == \
        CustomizeParams().derived_run_id()
    with pytest.raises(ValidationError, match="gpus_per_subject"):
        CustomizeParams(gpus_per_subject=0)


def test_device_index_follows_the_gpu_ray_assigned() -> None:
    assert cuda_index(3, None) == 3  # all GPUs visible (Ray leaves the variable alone)
    assert cuda_index("5", "4,5,6") == 1  # the raylet itself was limited to GPUs 4-6
    with pytest.raises(RuntimeError, match="cannot see"):
        cuda_index(2, "0,1")


def test_a_task_runs_on_the_gpu_ray_assigned_it_and_on_no_other() -> None:
    assert choose_device(True, ["1"], None) == "cuda:1"
    assert choose_device(True, ["6"], "4,6") == "cuda:1"
    assert choose_device(True, [], None) == "cpu"  # a Ray task given no GPU leaves them alone
    assert choose_device(True, None, None) == "cuda"  # outside Ray (the local task runner)
    assert choose_device(False, None, None) == "cpu"
    assert choose_device(False, ["0"], None) == "cpu"  # a logical GPU on a machine without


def test_a_worker_refuses_a_gpu_other_than_the_one_its_cuda_was_set_up_for() -> None:
    visible = VisibleDevices()
    visible.check(None)
    visible.check(None)  # Ray told to leave CUDA_VISIBLE_DEVICES alone: every task alike
    with pytest.raises(RuntimeError, match="cannot switch to 1"):
        visible.check("1")  # a kept worker that Ray handed another GPU through the variable
    fresh = VisibleDevices()
    fresh.check("1")
    fresh.check("1")


def test_gpu_workers_are_kept_unless_switched_off() -> None:
    assert ComputePlan("ray", gpus_per_task=1.0).remote_options()["max_calls"] == 0
    fresh = ComputePlan("ray", gpus_per_task=1.0, reuse_gpu_workers=False).remote_options()
    assert "max_calls" not in fresh  # Ray's default: a new process per GPU task
    assert CustomizeParams(reuse_gpu_workers=False).derived_run_id() == \
        CustomizeParams().derived_run_id()


WORKER_PROBE = """
import json, os, sys, time

import ray
from prefect import flow, task

from flows.compute import plan_compute, ray_init_kwargs
from flows.customize import _task_runner
from flows.schedule import Dispatcher, Job
from tasks.resources import device_for_task

ray.init(num_gpus=1, **ray_init_kwargs(""))  # one logical GPU: tasks ask for it as on a GPU node


@task
def probe() -> dict:
    gpu = ray.get_runtime_context().get_accelerator_ids()["GPU"]
    return {"pid": os.getpid(), "gpu": gpu, "device": device_for_task(),
            "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>")}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


out = {}
for reuse in (False, True):
    plan = plan_compute("ray", reuse_gpu_workers=reuse)

    def dispatched(jobs):
        return Dispatcher(plan, lambda: _task_runner(plan)).run(jobs).done

    @flow
    def three_tasks() -> list[dict]:  # one after another
        done = dispatched([Job(f"p{i}", "probe", (f"p{i}",), probe, lambda _done: {},
                               needs=(f"p{i - 1}",) if i else ()) for i in range(3)])
        return [done[f"p{i}"]["probe"] for i in range(3)]

    @flow
    def cpu_task() -> dict:
        done = dispatched([Job("cpu", "probe", ("cpu",), probe, lambda _done: {}, gpu=False)])
        return done["cpu"]["probe"]

    runs = three_tasks()
    cpu_only = cpu_task() if reuse else None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not reuse and any(alive(r["pid"]) for r in runs):
        time.sleep(0.5)  # a finished worker of a one-call task is on its way out
    out[str(reuse)] = {"gpus_per_task": plan.gpus_per_task, "runs": runs,
                       "alive": [alive(r["pid"]) for r in runs], "cpu_only": cpu_only}
ray.shutdown()
sys.stdout.write("PROBE " + json.dumps(out) + "\\n")
"""


@pytest.mark.ray
def test_kept_gpu_workers_serve_later_tasks_and_ray_leaves_the_gpu_choice_to_them(
        prefect_server, tmp_path) -> None:
    """Tasks submitted as the flow submits them, on a Ray instance of its own with one logical
    GPU. Kept: the three tasks run in one process that stays up. Not kept: each task's process
    exits after it (Ray's default for GPU tasks). Either way Ray assigns GPU 0 and leaves
    CUDA_VISIBLE_DEVICES alone, so a kept worker can serve any GPU it is given."""
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "RAY_AUTH_MODE": "disabled",
           "EQDIFF_RAY_NUM_CPUS": "2", "PYTHONPATH": str(Path(__file__).parents[2])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, "-c", WORKER_PROBE], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("PROBE "))
    kept, fresh = result["True"], result["False"]
    for variant in (kept, fresh):
        assert variant["gpus_per_task"] == 1.0
        assert all(r["gpu"] == ["0"] and r["visible"] == "<unset>" for r in variant["runs"])
        assert all(r["device"] == "cpu" for r in variant["runs"])  # no CUDA on this machine
    assert len({r["pid"] for r in kept["runs"]}) == 1 and all(kept["alive"])
    assert kept["cpu_only"]["gpu"] == [] and kept["cpu_only"]["device"] == "cpu"
    assert len({r["pid"] for r in fresh["runs"]}) == 3 and not any(fresh["alive"])
